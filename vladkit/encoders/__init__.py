"""Encoders: one fixed-length vector per image from its local descriptors."""

from .bof import BoFEncoder
from .fisher import FisherEncoder
from .llc import LLCEncoder
from .multi import MultiVocabulary
from .netvlad import NetVLADEncoder
from .netvlad_params import NetVLADParams, init_netvlad, load_netvlad, save_netvlad
from .pyramid import SpatialPyramid
from .supervector import SuperVectorEncoder
from .vlad import VLADEncoder

__all__ = [
    "BoFEncoder",
    "FisherEncoder",
    "LLCEncoder",
    "MultiVocabulary",
    "NetVLADEncoder",
    "NetVLADParams",
    "SpatialPyramid",
    "SuperVectorEncoder",
    "VLADEncoder",
    "init_netvlad",
    "load_netvlad",
    "save_netvlad",
]
