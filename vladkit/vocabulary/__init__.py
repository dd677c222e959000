"""Visual vocabularies: k-means centers and diagonal Gaussian mixtures, and their files.

A vocabulary is trained on a bounded sample of descriptors spread over the images
(:mod:`.sampling`), optionally after a PCA (:mod:`.base`, shared by both kinds), as k-means
words (:mod:`.kmeans`) or a diagonal Gaussian mixture (:mod:`.gmm`), or made from known
arrays (:mod:`.arrays`); it is saved as an ``.npz`` file (:mod:`.fileformat`) and read back
with :func:`load_vocabulary` (:mod:`.loading`). Imports only :mod:`vladkit.kernels` and
:mod:`vladkit._util`. The public names of vladkit 0.1's ``vladkit.vocabulary`` module are
re-exported here, loaded on first use (``from vladkit.vocabulary import KMeansVocabulary``).
"""

from .._lazy import lazy_exports

_LOCATIONS = {
    "DescriptorSampler": "sampling",
    "FAISS_THRESHOLD": "kmeans",
    "FILE_FORMAT": "fileformat",
    "FILE_FORMAT_VERSION": "fileformat",
    "GMMVocabulary": "gmm",
    "KMeansVocabulary": "kmeans",
    "MINIBATCH_THRESHOLD": "kmeans",
    "VocabularyFileError": "fileformat",
    "WEIGHTS_SUM_TOLERANCE": "arrays",
    "load_vocabulary": "loading",
}

__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS)

# The old module's __all__ (its constants are importable by name, as they were).
__all__ = ["DescriptorSampler", "GMMVocabulary", "KMeansVocabulary", "VocabularyFileError", "load_vocabulary"]
