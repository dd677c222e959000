"""Spatial pyramids: one encoding per cell of a fixed layout, concatenated (Lazebnik et al.
2006; for VLAD and Fisher vectors as in Chatfield et al. 2011)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from .normalize import l2_normalize
from ._base import descriptor_sets, encode_whole, work_dtype

#: 1x1 + 2x2 + 3 horizontal bands: the layout of Chatfield et al.'s encoding comparison.
DEFAULT_LEVELS = ((1, 1), (2, 2), (1, 3))


class SpatialPyramid(TransformerMixin, BaseEstimator):
    """Encode the descriptors of each cell of a spatial layout separately, and concatenate.

    For each level ``(n_x, n_y)`` the image is cut into ``n_x`` columns and ``n_y`` rows of
    equal size; a descriptor belongs to the cell holding its position. Every cell is
    encoded (and normalised) by the wrapped encoder exactly as a whole image would be, the
    cell vectors are concatenated level by level, row by row, and the result is
    L2-normalised (``l2``). A cell with no descriptors gives a zero block.

    Cells are laid on the pixel *edges*: positions are in OpenCV's convention (the centre
    of pixel ``(row i, column j)`` is at ``(x, y) = (j, i)``, as :class:`~vladkit.SIFT` and
    :class:`~vladkit.DenseSIFT` give them), so a ``w``-pixel-wide image spans
    ``[-0.5, w - 0.5)`` and column ``c`` of ``n_x`` spans
    ``[c w / n_x - 0.5, (c + 1) w / n_x - 0.5)``, i.e. holds the positions with
    ``floor((x + 0.5) n_x / w) == c``; rows likewise with ``y``, ``h`` and ``n_y``.
    Positions outside the image go to the nearest cell. The layout is therefore
    mirror-symmetric: a position ``x`` and its mirror ``w - 1 - x`` fall in columns ``c``
    and ``n_x - 1 - c`` (unless ``x`` lies exactly on a cell boundary, which, the
    intervals being half-open, goes to the cell on its right or below).

    VLFeat's PHOW application (``apps/phow_caltech101.m``) lays the cells on the pixel
    *centres* instead: ``vl_binsearch(linspace(1, width, n_x + 1), frames(1,:))`` in
    MATLAB's 1-based coordinates, i.e. boundaries at ``c (w - 1) / n_x`` in the 0-based
    coordinates used here, from the first pixel centre to the last (a position on the last
    pixel centre, or beyond, would fall outside VLFeat's bins; PHOW's frames never do).
    Both layouts are mirror-symmetric and share the middle boundary; boundary ``c`` of
    the two differs by ``|1/2 - c / n_x|`` pixels (less than half a pixel), so only a
    descriptor centred that close to a boundary can land in a neighbouring cell of
    VLFeat's layout.

    Parameters
    ----------
    encoder : BoFEncoder, VLADEncoder, FisherEncoder, LLCEncoder or SuperVectorEncoder
        Fitted on all descriptors of the training images by ``fit`` (a clone of it).
        LLCEncoder's max pooling is per cell (each cell is encoded as an image).
    levels : sequence of (n_x, n_y), default=((1, 1), (2, 2), (1, 3))
    l2 : bool, default=True

    Attributes
    ----------
    encoder_ : the fitted encoder
    n_cells_ : int
    n_features_out_ : int, ``n_cells_ * encoder_.n_features_out_``
    """

    def __init__(self, encoder, levels=DEFAULT_LEVELS, l2=True):
        self.encoder = encoder
        self.levels = levels
        self.l2 = l2

    def _check_levels(self):
        levels = [tuple(level) for level in self.levels]
        if not levels or any(len(level) != 2 or min(level) < 1 for level in levels):
            raise ValueError(f"levels must be a non-empty sequence of (n_x, n_y) >= 1, got {self.levels!r}")
        return levels

    def fit(self, X, y=None):
        """Fit the wrapped encoder on all the descriptors of X (cells do not matter here)."""
        levels = self._check_levels()
        self.encoder_ = clone(self.encoder).fit(X)
        self.n_cells_ = sum(nx * ny for nx, ny in levels)
        self.n_features_out_ = self.n_cells_ * self.encoder_.n_features_out_
        return self

    def transform(self, X):
        """Encode each image's cells.

        Parameters
        ----------
        X : list of LocalFeatures
            Positions and image shapes place the descriptors in cells.

        Returns
        -------
        ndarray ``(n_images, n_features_out_)``, float32
        """
        check_is_fitted(self, "encoder_")
        X = list(X)
        dtype = work_dtype(descriptor_sets(X), self.encoder_._float32_limit)  # also validates
        return encode_whole(self, X, dtype)

    def _accumulate(self, n_images, dtype=np.float32):
        """A :class:`PyramidAccumulation` of ``n_images`` images (whole or in pieces)."""
        return PyramidAccumulation(self, n_images, dtype)

    def _thread_limits(self):
        return self.encoder_._thread_limits()

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "encoder_")
        names = self.encoder_.get_feature_names_out()
        out = []
        for nx, ny in self._check_levels():
            for row in range(ny):
                for column in range(nx):
                    out.extend(f"spm{nx}x{ny}_r{row}c{column}_{name}" for name in names)
        return np.asarray(out, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X is a list of LocalFeatures (their positions place the descriptors in cells):
        # no input tag describes it; neither a 2-D nor a 3-D array has positions.
        tags.input_tags.two_d_array = False
        tags.transformer_tags.preserves_dtype = ["float32"]  # float32 vectors, as the encoders
        return tags


class PyramidAccumulation:
    """A spatial pyramid's sums: each piece of an image's features is split into its cells,
    and cell ``c`` of image ``i`` accumulates as image ``i * n_cells + c`` of the wrapped
    encoder's :class:`~vladkit.encoders._base.Accumulation`."""

    def __init__(self, pyramid, n_images, dtype):
        self.pyramid = pyramid
        self.levels = pyramid._check_levels()
        self.cells = pyramid.encoder_._accumulate(n_images * pyramid.n_cells_, dtype)

    def add(self, image, features):
        """Add LocalFeatures (positions and image shape place them in cells) of ``image``."""
        if not hasattr(features, "positions"):
            raise TypeError(
                f"image {image}: SpatialPyramid needs LocalFeatures (positions and image "
                f"shape), got {type(features).__name__}"
            )
        first = image * self.pyramid.n_cells_
        descriptors = np.asarray(features.descriptors)
        for cell, mask in enumerate(cell_masks(features, self.levels)):
            self.cells.add(first + cell, descriptors[mask])

    def finish(self):
        vectors = self.cells.finish().reshape(len(self.cells.counts) // self.pyramid.n_cells_, -1)
        if self.pyramid.l2:
            l2_normalize(vectors)
        return vectors


def cell_masks(features, levels):
    """Boolean masks over the descriptors of ``features``, one per cell, in output order.

    Cell (row, column) of level (n_x, n_y) holds the positions with
    ``floor((x + 0.5) n_x / w) == column`` and ``floor((y + 0.5) n_y / h) == row``
    (clipped to the grid): positions are pixel centres, the cells' boundaries fall on
    pixel edges (see :class:`SpatialPyramid`).
    """
    height, width = features.image_shape
    # float64: in float32, (x + 0.5) n / w can round a position lying just before a
    # boundary onto it, i.e. into the next cell, and break the mirror symmetry.
    x = np.asarray(features.positions[:, 0], dtype=np.float64) + 0.5
    y = np.asarray(features.positions[:, 1], dtype=np.float64) + 0.5
    masks = []
    for nx, ny in levels:
        column = np.clip(np.floor(x * nx / width), 0, nx - 1).astype(np.int64)
        row = np.clip(np.floor(y * ny / height), 0, ny - 1).astype(np.int64)
        cell = row * nx + column
        masks.extend(cell == index for index in range(nx * ny))
    return masks
