"""Encoders: one fixed-length vector per image from its local descriptors."""

from .bof import BoFEncoder
from .fisher import FisherEncoder
from .pyramid import SpatialPyramid
from .vlad import VLADEncoder

__all__ = ["BoFEncoder", "FisherEncoder", "SpatialPyramid", "VLADEncoder"]
