"""Normalisations of encoded vectors, applied in place on (n_images, dim) arrays.

The order VLFeat applies them in, and which the encoders follow, is: power (signed
square root when alpha = 0.5), then intra (per visual word), then global L2. Norms are
clamped below at 1e-12 (VLFeat's ``VL_MAX(norm, 1e-12)``), so a block or vector that is
all zeros stays zeros instead of becoming NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NORM_FLOOR", "l1_normalize", "l2_normalize", "intra_normalize", "power_normalize"]

NORM_FLOOR = 1e-12


def power_normalize(vectors, alpha=0.5):
    """sign(v) |v|^alpha, element-wise, in place (Perronnin et al. 2010; Jegou et al. 2012)."""
    if alpha == 0.5:
        magnitude = np.sqrt(np.abs(vectors))
    else:
        magnitude = np.abs(vectors) ** alpha
    np.copysign(magnitude, vectors, out=vectors)
    return vectors


def l2_normalize(vectors):
    """v / max(||v||_2, 1e-12) for each row, in place."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    vectors /= np.maximum(norms, NORM_FLOOR).astype(vectors.dtype)[:, None]
    return vectors


def l1_normalize(vectors):
    """v / max(||v||_1, 1e-12) for each row, in place."""
    norms = np.abs(vectors).sum(axis=1, dtype=np.float64)
    vectors /= np.maximum(norms, NORM_FLOOR).astype(vectors.dtype)[:, None]
    return vectors


def intra_normalize(vectors, n_blocks):
    """L2-normalise each of the ``n_blocks`` consecutive blocks of every row, in place
    (Arandjelovic & Zisserman 2013: one block per visual word)."""
    n, dim = vectors.shape
    blocks = vectors.reshape(n * n_blocks, dim // n_blocks)
    l2_normalize(blocks)
    return vectors
