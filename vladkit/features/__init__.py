"""Local features: reading images (headers checked before any pixel is decoded), SIFT
and VLFeat-exact dense SIFT, RootSIFT, and the spatial augmentation of descriptors.

Imports only :mod:`vladkit.kernels` and :mod:`vladkit._util`. The extractors' names are
re-exported here, loaded on first use (``from vladkit.features import DenseSIFT``, the
path vladkit 0.1 had).
"""

from .._lazy import lazy_exports

_LOCATIONS = {
    "DenseSIFT": "extractors",
    "ImageSkippedWarning": "extractors",
    "LocalFeatures": "extractors",
    "SIFT": "extractors",
    "root_sift": "extractors",
}

__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS)

__all__ = sorted(_LOCATIONS)
