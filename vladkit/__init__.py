"""vladkit: classical local-feature encodings (BoF, VLAD, Fisher vectors) for images."""

__version__ = "0.1.0"

from .encoders import BoFEncoder, FisherEncoder, VLADEncoder
from .features import SIFT, DenseSIFT, LocalFeatures, root_sift
from .images import ImageReadError, list_images, read_image
from .vocabulary import (
    DescriptorSampler,
    GMMVocabulary,
    KMeansVocabulary,
    VocabularyFileError,
    load_vocabulary,
)

__all__ = [
    "BoFEncoder",
    "FisherEncoder",
    "VLADEncoder",
    "DenseSIFT",
    "DescriptorSampler",
    "GMMVocabulary",
    "KMeansVocabulary",
    "VocabularyFileError",
    "load_vocabulary",
    "ImageReadError",
    "LocalFeatures",
    "SIFT",
    "__version__",
    "list_images",
    "read_image",
    "root_sift",
]
