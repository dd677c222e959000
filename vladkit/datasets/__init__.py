"""Image sets: labelled folders (``folders``), and the near-duplicate benchmark the demo
builds from the photos that ship with installed packages, nothing downloaded
(``near_duplicates``). Names are re-exported lazily: importing the package loads neither."""

from .._lazy import lazy_exports

_LOCATIONS = {
    "labelled_images": "folders",
    "ATTACKS": "near_duplicates",
    "NearDuplicateSet": "near_duplicates",
    "demo_photos": "near_duplicates",
    "near_duplicate_set": "near_duplicates",
}
__getattr__, __dir__ = lazy_exports(__name__, _LOCATIONS)

__all__ = [
    "ATTACKS",
    "NearDuplicateSet",
    "demo_photos",
    "labelled_images",
    "near_duplicate_set",
]
