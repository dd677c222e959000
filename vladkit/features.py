"""Local features: sparse SIFT (OpenCV), dense multi-scale SIFT (PHOW-style), RootSIFT.

Both extractors are scikit-learn transformers from a list of images (paths, encoded bytes
or arrays, see :func:`vladkit.images.read_image`) to a list of :class:`LocalFeatures`, one
per image, in input order. They hold no fitted state, so ``fit`` does nothing and
``transform`` can be called straight away.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from ._threads import effective_n_jobs
from .dsift import DESCRIPTOR_DIM, dense_sift
from .images import DEFAULT_MAX_PIXELS, ImageReadError, read_image

__all__ = ["DenseSIFT", "ImageSkippedWarning", "LocalFeatures", "SIFT", "root_sift"]


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """The local features of one image.

    Attributes
    ----------
    descriptors : ndarray (n, D), float32
        One descriptor per row.
    positions : ndarray (n, 2), float32
        Keypoint centres ``(x, y)`` in pixels of the image as read (after any ``max_side``
        downscaling), x to the right, y down, as OpenCV gives them.
    scales : ndarray (n,), float32
        Keypoint scale sigma in pixels: the descriptor's spatial bins are ``3 * sigma``
        wide (OpenCV's ``KeyPoint.size / 2``; for dense SIFT ``bin_size / 3``).
    image_shape : tuple (height, width)
        Shape of the image the positions refer to.
    """

    descriptors: np.ndarray
    positions: np.ndarray
    scales: np.ndarray
    image_shape: tuple

    def __post_init__(self):
        n = len(self.descriptors)
        if self.descriptors.ndim != 2:
            raise ValueError(f"descriptors must be 2-D (n, D), got shape {self.descriptors.shape}")
        if self.positions.shape != (n, 2):
            raise ValueError(f"positions must have shape ({n}, 2), got {self.positions.shape}")
        if self.scales.shape != (n,):
            raise ValueError(f"scales must have shape ({n},), got {self.scales.shape}")
        if len(self.image_shape) != 2:
            raise ValueError(f"image_shape must be (height, width), got {self.image_shape}")

    def __len__(self):
        return len(self.descriptors)

    def __repr__(self):
        n, dim = self.descriptors.shape
        return f"LocalFeatures(n={n}, dim={dim}, image_shape={tuple(self.image_shape)})"


def root_sift(descriptors):
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise each row, then square-root.

    ``sqrt(x / ||x||_1)`` has unit L2 norm, so Euclidean distance between RootSIFT
    descriptors is the Hellinger kernel between the original histograms. Rows that are
    all zero stay zero. SIFT descriptors are non-negative; negative entries are clipped.

    Parameters
    ----------
    descriptors : ndarray (n, D)

    Returns
    -------
    ndarray (n, D), same float dtype (float32 for integer input)
    """
    x = np.asarray(descriptors)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    x = np.maximum(x, 0)
    l1 = x.sum(axis=1, keepdims=True)
    return np.sqrt(x / np.maximum(l1, np.finfo(x.dtype).tiny))


def _check_images(images):
    # A single path, bytes or 2-D array would silently iterate as many "images".
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or (
        isinstance(images, np.ndarray) and images.ndim < 3
    ):
        raise TypeError(
            "X must be a list of images (paths, bytes or arrays), got a single "
            f"{type(images).__name__}; wrap it in a list"
        )
    return list(images)


def _empty_features(dim, image_shape):
    return LocalFeatures(
        np.zeros((0, dim), np.float32), np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32), tuple(image_shape),
    )


class ImageSkippedWarning(UserWarning):
    """An unreadable image was skipped (``on_error="skip"``); the message names it."""


class _Extractor(TransformerMixin, BaseEstimator):
    """Shared machinery: reading, parallelism over images, the stateless fit."""

    def fit(self, X=None, y=None):
        """Do nothing (the extractor has no fitted state); present for pipelines."""
        return self

    _descriptor_dim = DESCRIPTOR_DIM

    def transform(self, X):
        """Extract the local features of each image.

        Parameters
        ----------
        X : list of images
            Paths, encoded bytes or arrays, as :func:`vladkit.images.read_image` accepts.

        Returns
        -------
        list of LocalFeatures
            One per image, in the order of ``X``.

        Raises
        ------
        vladkit.images.ImageReadError
            An image cannot be read (its path and the reason are in the message).
        """
        self._validate_params()
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        images = _check_images(X)
        n_jobs = effective_n_jobs(self.n_jobs) or 1
        if n_jobs == 1 or len(images) <= 1:
            return [self._extract_one(image) for image in images]
        # Threads suffice: OpenCV and numpy release the GIL in the heavy parts, and
        # map() returns results in input order.
        with ThreadPoolExecutor(max_workers=min(n_jobs, len(images))) as pool:
            return list(pool.map(self._extract_one, images))

    def _extract_one(self, image):
        try:
            grey = read_image(image, mode="gray", max_pixels=self.max_pixels, max_side=self.max_side)
        except ImageReadError as error:
            if self.on_error != "skip":
                raise
            warnings.warn(f"skipped {error.path}: {error.reason}", ImageSkippedWarning, stacklevel=2)
            return _empty_features(self._descriptor_dim, (0, 0))
        features = self._extract(grey)
        if self.root:
            features = LocalFeatures(
                root_sift(features.descriptors), features.positions, features.scales,
                features.image_shape,
            )
        return features

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        return tags


class SIFT(_Extractor):
    """Sparse SIFT keypoints and descriptors (Lowe 2004), via OpenCV.

    Parameters
    ----------
    n_features : int, default=0
        Keep the ``n_features`` strongest keypoints (0 keeps all).
    n_octave_layers : int, default=3
        Scale levels per octave.
    contrast_threshold : float, default=0.04
        Drop extrema of the difference of Gaussians weaker than
        ``contrast_threshold / n_octave_layers`` (image values in [0, 1]).
    edge_threshold : float, default=10
        Drop edge-like extrema whose principal curvature ratio exceeds this.
    sigma : float, default=1.6
        Gaussian blur of the first octave.
    root : bool, default=False
        Return RootSIFT descriptors (see :func:`root_sift`).
    max_side, max_pixels
        Passed to :func:`vladkit.images.read_image`.
    on_error : {"raise", "skip"}, default="raise"
        An image that cannot be read raises :class:`vladkit.ImageReadError` (naming the
        file and the reason), or with "skip" is reported by an
        :class:`ImageSkippedWarning` and gives empty features (no descriptors, so zero
        vectors downstream): a folder with a few broken files is still encoded.
    n_jobs : int, default=1
        Images processed in parallel (threads); -1 uses every core.

    Notes
    -----
    Descriptors are float32, OpenCV's convention: L2 norm about 512, integer values in
    [0, 255]. An image without keypoints (e.g. a constant one) gives a ``(0, 128)`` array.
    """

    def __init__(self, n_features=0, *, n_octave_layers=3, contrast_threshold=0.04,
                 edge_threshold=10.0, sigma=1.6, root=False, max_side=None,
                 max_pixels=DEFAULT_MAX_PIXELS, on_error="raise", n_jobs=1):
        self.n_features = n_features
        self.n_octave_layers = n_octave_layers
        self.contrast_threshold = contrast_threshold
        self.edge_threshold = edge_threshold
        self.sigma = sigma
        self.root = root
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.on_error = on_error
        self.n_jobs = n_jobs

    def _validate_params(self):
        if not isinstance(self.n_features, (int, np.integer)) or self.n_features < 0:
            raise ValueError(f"n_features must be an integer >= 0, got {self.n_features!r}")
        if not isinstance(self.n_octave_layers, (int, np.integer)) or self.n_octave_layers < 1:
            raise ValueError(f"n_octave_layers must be an integer >= 1, got {self.n_octave_layers!r}")
        for name in ("contrast_threshold", "edge_threshold", "sigma"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")

    def _extract(self, grey):
        # A detector per call: OpenCV's Feature2D objects are not documented thread-safe.
        detector = cv2.SIFT_create(
            nfeatures=int(self.n_features), nOctaveLayers=int(self.n_octave_layers),
            contrastThreshold=float(self.contrast_threshold),
            edgeThreshold=float(self.edge_threshold), sigma=float(self.sigma),
        )
        keypoints, descriptors = detector.detectAndCompute(grey, None)
        if descriptors is None or len(keypoints) == 0:
            return _empty_features(DESCRIPTOR_DIM, grey.shape)
        positions = np.array([kp.pt for kp in keypoints], dtype=np.float32)
        scales = np.array([kp.size / 2 for kp in keypoints], dtype=np.float32)
        return LocalFeatures(
            np.ascontiguousarray(descriptors, dtype=np.float32), positions, scales, grey.shape
        )


class DenseSIFT(_Extractor):
    """Dense multi-scale SIFT on a regular grid, like VLFeat's PHOW (Bosch et al. 2007).

    For every bin size ``s`` in ``sizes`` the image is smoothed with a Gaussian of
    sigma = sqrt((s/6)^2 - 1/4) and described at every grid point whose 4 x 4 bins of
    ``s`` pixels fit inside it; the grids of all sizes share descriptor centres. The
    number of descriptors of an ``h x w`` image is (see :func:`vladkit.dsift.dense_grid`)

        sum over s of  n(w, s) * n(h, s),
        n(L, s) = max(0, floor((L - 1 - floor(1.5 (max(sizes) - s)) - 3 s) / step) + 1)

    (with ``low_contrast="zero"``, the default). The algorithm is the dense one of
    ``vl_dsift`` (see :mod:`vladkit.dsift`), not a loop over keypoints.

    Parameters
    ----------
    step : int, default=4
        Grid step in pixels.
    sizes : tuple of int, default=(4, 6, 8, 10)
        Spatial bin sizes in pixels.
    contrast_threshold : float or None, default=0.005
        Descriptors whose contrast is below this are "low contrast" (PHOW's rule). The
        contrast is VLFeat's ``vl_dsift`` frame norm: the descriptor's sum before
        normalisation (image in [0, 1]) over (3 s + 1)^2. ``None`` disables the test.
    low_contrast : {"zero", "drop"}, default="zero"
        What to do with low-contrast descriptors: set them to 0 and keep the grid (VLFeat
        PHOW), or drop them.
    smooth : bool, default=True
        Apply the per-size Gaussian pre-smoothing.
    root : bool, default=False
        Return RootSIFT descriptors (see :func:`root_sift`).
    max_side, max_pixels
        Passed to :func:`vladkit.images.read_image`.
    on_error : {"raise", "skip"}, default="raise"
        An image that cannot be read raises :class:`vladkit.ImageReadError` (naming the
        file and the reason), or with "skip" is reported by an
        :class:`ImageSkippedWarning` and gives empty features (no descriptors, so zero
        vectors downstream): a folder with a few broken files is still encoded.
    n_jobs : int, default=1
        Images processed in parallel (threads); -1 uses every core.

    Notes
    -----
    Descriptors follow :class:`SIFT`'s layout and scale (L2 norm 512); they are not
    rounded to integers. Positions are descriptor centres; ``scales`` is ``s / 3``.
    """

    def __init__(self, step=4, sizes=(4, 6, 8, 10), *, contrast_threshold=0.005,
                 low_contrast="zero", smooth=True, root=False, max_side=None,
                 max_pixels=DEFAULT_MAX_PIXELS, on_error="raise", n_jobs=1):
        self.step = step
        self.sizes = sizes
        self.contrast_threshold = contrast_threshold
        self.low_contrast = low_contrast
        self.smooth = smooth
        self.root = root
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.on_error = on_error
        self.n_jobs = n_jobs

    def _validate_params(self):
        if not isinstance(self.step, (int, np.integer)) or self.step < 1:
            raise ValueError(f"step must be an integer >= 1, got {self.step!r}")
        sizes = np.atleast_1d(np.asarray(self.sizes))
        if sizes.size == 0 or sizes.dtype.kind not in "iu" or np.any(sizes < 1):
            raise ValueError(f"sizes must be a non-empty sequence of integers >= 1, got {self.sizes!r}")
        if self.contrast_threshold is not None and not (
            np.isfinite(self.contrast_threshold) and self.contrast_threshold >= 0
        ):
            raise ValueError(
                f"contrast_threshold must be a number >= 0 or None, got {self.contrast_threshold!r}"
            )
        if self.low_contrast not in ("zero", "drop"):
            raise ValueError(f"low_contrast must be 'zero' or 'drop', got {self.low_contrast!r}")

    def _extract(self, grey):
        sizes = [int(s) for s in np.atleast_1d(self.sizes)]
        descriptors, positions, bin_sizes, contrast = dense_sift(
            grey, step=int(self.step), sizes=sizes, smooth=bool(self.smooth)
        )
        if self.contrast_threshold is not None:
            low = contrast < self.contrast_threshold
            if self.low_contrast == "zero":
                descriptors[low] = 0
            else:
                keep = ~low
                descriptors, positions, bin_sizes = descriptors[keep], positions[keep], bin_sizes[keep]
        return LocalFeatures(descriptors, positions, bin_sizes / np.float32(3), grey.shape)
