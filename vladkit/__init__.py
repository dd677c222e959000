"""vladkit: classical local-feature encodings (BoF, VLAD, Fisher vectors) for images."""

from ._version import __version__  # noqa: F401 (set in _version.py, a leaf other modules import)

import os as _os

# Idle threads sleep rather than spin: vladkit's kernels run on numba's OpenMP threads
# (BLAS on one thread inside them, vladkit/_threads.py), and a BLAS pool left spinning by
# the user's own numpy product, or numba's workers spinning while extraction threads
# work, would steal the cores the other needs next (measured: Fisher vectors and VLAD
# 1.8x slower in a loop that also calls numpy's @). Sleeping threads cost microseconds to
# wake. The user's settings win. libgomp reads its variable when numba first loads it,
# after this; OpenBLAS when it is loaded, so an OpenBLAS that numpy or scipy loaded
# before vladkit is given the timeout now (_blas.apply_thread_timeout).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
from . import _blas as _blas_module  # noqa: E402

_blas_module.apply_thread_timeout()
# faiss's bundled OpenBLAS runs its generic kernel on CPUs newer than itself: vladkit.index
# loads faiss with the kernel this CPU supports, unless OPENBLAS_CORETYPE is set
# (vladkit/_blas.py).
import importlib as _importlib  # noqa: E402

#: Where each public name lives: ``import vladkit`` loads none of them (numpy,
#: scikit-learn, numba and faiss load with the first name used), so the ``vladkit``
#: command answers ``--help`` at once (PEP 562).
_LOCATIONS = {
    "labelled_images": "datasets",
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
    "EncodedImages": "encodings",
    "Recipe": "encodings",
    "load_encodings": "encodings",
    "GroundTruth": "evaluation",
    "average_precision": "evaluation",
    "folder_ground_truth": "evaluation",
    "holidays_ground_truth": "evaluation",
    "mean_average_precision": "evaluation",
    "recall_at_k": "evaluation",
    "retrieval_ground_truth": "evaluation",
    "DenseSIFT": "features",
    "ImageSkippedWarning": "features",
    "LocalFeatures": "features",
    "SIFT": "features",
    "root_sift": "features",
    "fisher_encode": "functional",
    "vlad_encode": "functional",
    "ImageEncoder": "image_encoder",
    "ImageReadError": "images",
    "list_images": "images",
    "read_image": "images",
    "read_size": "images",
    "IndexFileError": "index",
    "PCAWhitening": "index",
    "VectorIndex": "index",
    "EncodeResult": "jobs",
    "FolderLockedError": "_locking",
    "encode_images": "jobs",
    "FeatureStore": "rerank",
    "RerankResult": "rerank",
    "rerank": "rerank",
    "write_feature_store": "rerank",
    "ShardedEncodings": "sharded",
    "Verification": "spatial",
    "match_descriptors": "spatial",
    "spatial_score": "spatial",
    "verify": "spatial",
    "SpatialAugmentation": "spatial_augmentation",
    "augment_positions": "spatial_augmentation",
    "DescriptorSampler": "vocabulary",
    "GMMVocabulary": "vocabulary",
    "KMeansVocabulary": "vocabulary",
    "VocabularyFileError": "vocabulary",
    "load_vocabulary": "vocabulary",
}


def __getattr__(name):
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'vladkit' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LOCATIONS))


__all__ = [
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
