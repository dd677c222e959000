"""vladkit: classical local-feature encodings (BoF, VLAD, Fisher vectors) for images."""

from ._version import __version__  # noqa: F401 (set in _version.py, a leaf other modules import)

import os as _os

# Idle threads sleep rather than spin: vladkit's kernels run on numba's OpenMP threads
# (BLAS on one thread inside them, vladkit/_util/threads.py), and a BLAS pool left
# spinning by the user's own numpy product, or numba's workers spinning while extraction threads
# work, would steal the cores the other needs next (measured: Fisher vectors and VLAD
# 1.8x slower in a loop that also calls numpy's @). Sleeping threads cost microseconds to
# wake. The user's settings win. libgomp reads its variable when numba first loads it,
# after this; OpenBLAS when it is loaded, so an OpenBLAS that numpy or scipy loaded
# before vladkit is given the timeout now (_util.blas.apply_thread_timeout).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from ._util import blas as _blas_module  # noqa: E402

_blas_module.apply_thread_timeout()
# faiss's bundled OpenBLAS runs its generic kernel on CPUs newer than itself:
# vladkit.retrieval.index loads faiss with the kernel this CPU supports, unless
# OPENBLAS_CORETYPE is set (vladkit/_util/blas.py).

# vladkit 0.1's module paths (vladkit.index, vladkit.rerank, ...) keep working for one
# release, warning with the new path (vladkit/_moved.py).
from . import _moved as _moved_module  # noqa: E402
from ._lazy import lazy_exports as _lazy_exports  # noqa: E402

_moved_module.install()

#: Where each public name lives: ``import vladkit`` loads none of them (numpy,
#: scikit-learn, numba and faiss load with the first name used), so the ``vladkit``
#: command answers ``--help`` at once (PEP 562).
_LOCATIONS = {
    "labelled_images": "datasets.folders",
    "ASMKEncoder": "encoders.asmk",
    "ASMKIndex": "retrieval.asmk_index",
    "WordSignatures": "encoders.asmk",
    "SMKEncoder": "encoders.smk",
    "SMKIndex": "retrieval.smk_index",
    "BoFEncoder": "encoders",
    "FisherEncoder": "encoders",
    "LLCEncoder": "encoders",
    "MultiVocabulary": "encoders",
    "NetVLADEncoder": "encoders",
    "NetVLADParams": "encoders",
    "SpatialPyramid": "encoders",
    "SuperVectorEncoder": "encoders",
    "VLADEncoder": "encoders",
    "init_netvlad": "encoders",
    "load_netvlad": "encoders",
    "save_netvlad": "encoders",
    "EncodedImages": "pipeline.encodings",
    "Recipe": "pipeline.recipe",
    "load_encodings": "pipeline.encodings",
    "GroundTruth": "retrieval.ground_truth",
    "average_precision": "retrieval.metrics",
    "folder_ground_truth": "retrieval.ground_truth",
    "holidays_ground_truth": "retrieval.ground_truth",
    "mean_average_precision": "retrieval.metrics",
    "recall_at_k": "retrieval.metrics",
    "retrieval_ground_truth": "retrieval.ground_truth",
    "DenseSIFT": "features.extractors",
    "ImageSkippedWarning": "features.extractors",
    "LocalFeatures": "features.extractors",
    "SIFT": "features.extractors",
    "root_sift": "features.extractors",
    "fisher_encode": "encoders.functional",
    "vlad_encode": "encoders.functional",
    "ImageEncoder": "pipeline.image_encoder",
    "ImageReadError": "features.images",
    "list_images": "features.images",
    "read_image": "features.images",
    "read_size": "features.images",
    "IndexFileError": "retrieval.index_files",
    "PCAWhitening": "retrieval.whitening",
    "VectorIndex": "retrieval.index",
    "EncodeResult": "pipeline.jobs",
    "FolderLockedError": "pipeline.locking",
    "encode_images": "pipeline.jobs",
    "FeatureStore": "retrieval.rerank",
    "RerankResult": "retrieval.rerank",
    "rerank": "retrieval.rerank",
    "write_feature_store": "retrieval.rerank",
    "ShardedEncodings": "pipeline.sharded",
    "ShardedWordSets": "pipeline.word_sets",
    "build_asmk_index": "retrieval.asmk_build",
    "Verification": "retrieval.spatial",
    "match_descriptors": "retrieval.spatial",
    "spatial_score": "retrieval.spatial",
    "verify": "retrieval.spatial",
    "SpatialAugmentation": "features.spatial_augmentation",
    "augment_positions": "features.spatial_augmentation",
    "DescriptorSampler": "vocabulary.sampling",
    "GMMVocabulary": "vocabulary.gmm",
    "KMeansVocabulary": "vocabulary.kmeans",
    "VocabularyFileError": "vocabulary.fileformat",
    "load_vocabulary": "vocabulary.loading",
}


__getattr__, __dir__ = _lazy_exports(__name__, _LOCATIONS)


__all__ = [
    "ASMKEncoder",
    "ASMKIndex",
    "WordSignatures",
    "SMKEncoder",
    "SMKIndex",
    "BoFEncoder",
    "FisherEncoder",
    "ImageEncoder",
    "LLCEncoder",
    "MultiVocabulary",
    "NetVLADEncoder",
    "NetVLADParams",
    "SuperVectorEncoder",
    "VLADEncoder",
    "fisher_encode",
    "vlad_encode",
    "EncodedImages",
    "EncodeResult",
    "FolderLockedError",
    "Recipe",
    "ShardedEncodings",
    "ShardedWordSets",
    "build_asmk_index",
    "encode_images",
    "FeatureStore",
    "RerankResult",
    "Verification",
    "match_descriptors",
    "rerank",
    "spatial_score",
    "verify",
    "write_feature_store",
    "load_encodings",
    "init_netvlad",
    "load_netvlad",
    "save_netvlad",
    "DenseSIFT",
    "DescriptorSampler",
    "GMMVocabulary",
    "KMeansVocabulary",
    "VocabularyFileError",
    "load_vocabulary",
    "GroundTruth",
    "average_precision",
    "folder_ground_truth",
    "holidays_ground_truth",
    "mean_average_precision",
    "recall_at_k",
    "retrieval_ground_truth",
    "IndexFileError",
    "PCAWhitening",
    "VectorIndex",
    "labelled_images",
    "ImageReadError",
    "ImageSkippedWarning",
    "LocalFeatures",
    "SIFT",
    "SpatialAugmentation",
    "SpatialPyramid",
    "augment_positions",
    "__version__",
    "list_images",
    "read_image",
    "read_size",
    "root_sift",
]
