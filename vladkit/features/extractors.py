"""Local features: sparse SIFT (OpenCV), dense multi-scale SIFT (PHOW-style), RootSIFT.

Both extractors are scikit-learn transformers from a list of images (paths, encoded bytes
or arrays, see :func:`vladkit.features.images.read_image`) to a list of :class:`LocalFeatures`, one
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

from .._util.threads import effective_n_jobs
from .dsift import (BYTES_PER_DESCRIPTOR, DEFAULT_BAND_BYTES, DESCRIPTOR_DIM, band_bytes, dense_grid, dense_sift,
    dense_sift_pieces)
from .._util.defaults import DENSE_MAX_SIDE, DENSE_SIZES, DENSE_STEP, SIFT_MAX_SIDE  # noqa: F401 (re-exported)
from .images import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from .spatial_augmentation import N_POSITION_DIMS, augment_positions, check_scale

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
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    return _root_sift_inplace(np.array(x, dtype=dtype))


#: Rows per block of the in-place RootSIFT (bounds its temporaries to a few MB).
_ROOT_BLOCK_ROWS = 1 << 14


def _root_sift_inplace(x):
    """:func:`root_sift` of a float array, computed in place block by block."""
    tiny = np.finfo(x.dtype).tiny
    for start in range(0, len(x), _ROOT_BLOCK_ROWS):
        block = x[start:start + _ROOT_BLOCK_ROWS]
        np.maximum(block, 0, out=block)
        block /= np.maximum(block.sum(axis=1, keepdims=True), tiny)
        np.sqrt(block, out=block)
    return x


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


def _read_bytes(pixels, decoded_pixels):
    """Decoding's peak: the decoded image (up to 4 channels) and the grey one it becomes."""
    return 4 * (decoded_pixels or pixels) + pixels


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

    @property
    def _descriptor_dim(self):
        """D of the descriptors this extractor gives (128, + 2 with spatial augmentation)."""
        augmented = getattr(self, "spatial_augmentation", None) is not None
        return DESCRIPTOR_DIM + (N_POSITION_DIMS if augmented else 0)

    #: Whether :meth:`extract_pieces` can bound its pieces (dense SIFT) or gives the
    #: whole image at once (OpenCV's sparse SIFT).
    _splits = True

    def transform(self, X):
        """Extract the local features of each image.

        Parameters
        ----------
        X : list of images
            Paths, encoded bytes or arrays, as :func:`vladkit.features.images.read_image` accepts.

        Returns
        -------
        list of LocalFeatures
            One per image, in the order of ``X``.

        Raises
        ------
        vladkit.features.images.ImageReadError
            An image cannot be read (its path and the reason are in the message).
        """
        self._check_params()
        images = _check_images(X)
        n_jobs = effective_n_jobs(self.n_jobs) or 1
        if len(images) == 1:
            # One image: its own work is split over the threads where it can be.
            return [self._extract_one(images[0], n_jobs)]
        if n_jobs == 1:
            return [self._extract_one(image) for image in images]
        # Threads suffice: OpenCV and numpy release the GIL in the heavy parts, and
        # map() returns results in input order.
        with ThreadPoolExecutor(max_workers=min(n_jobs, len(images))) as pool:
            return list(pool.map(self._extract_one, images))

    def _iter_transform(self, X):
        """:meth:`transform`'s features one image at a time, in order, as they are
        extracted by ``n_jobs`` threads, which go on with the next images meanwhile (all
        of X's features may exist at once, as with :meth:`transform`): the consumer's
        own work on an image (encoding it) overlaps the extraction of the next. An
        unreadable image yields its :class:`~vladkit.features.images.ImageReadError` instead of
        raising it; closing the generator cancels the images not started."""
        self._check_params()
        images = _check_images(X)
        n_jobs = effective_n_jobs(self.n_jobs) or 1

        def extract(image):
            try:
                return self._extract_one(image)
            except ImageReadError as error:
                return error
        with ThreadPoolExecutor(max_workers=min(n_jobs, max(len(images), 1))) as pool:
            futures = [pool.submit(extract, image) for image in images]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:
                    future.cancel()

    def extract_pieces(self, image, max_bytes=None):
        """The local features of one image as consecutive pieces, each within a memory bound.

        For an image whose descriptors alone would not fit in memory (dense SIFT on a
        50-megapixel panorama is ~12 million descriptors, 6 GB): the encoders' statistics
        are sums, so the pieces can be encoded one after another
        (:class:`vladkit.ImageEncoder` does). Concatenating the pieces' arrays gives
        ``transform([image])[0]``, row for row.

        Parameters
        ----------
        image : a path, encoded bytes or an array
        max_bytes : int or None
            Bound on one piece's descriptors together with the scratch that computes them
            (at least one grid row is produced at a time). None: one piece. Sparse
            :class:`SIFT` always gives one piece (OpenCV's detector needs the whole image:
            bound it with ``max_side``).

        Returns
        -------
        iterator of LocalFeatures
            All with the image's ``image_shape``; no piece when the image is skipped
            (``on_error="skip"``) or has no descriptors. The image is read by this call
            (an unreadable one raises here), its pieces are computed as they are asked for.
        """
        self._check_params()
        grey = self._read(image)  # now: a bad file is reported by this call
        if grey is None:
            return iter(())
        return self._finished_pieces(grey, max_bytes, effective_n_jobs(self.n_jobs) or 1)

    def _finished_pieces(self, grey, max_bytes, n_threads):
        for piece in self._pieces(grey, max_bytes, n_threads):
            if len(piece):
                yield self._finished(piece)

    # -- what each extractor defines ------------------------------------------------------

    def _pieces(self, grey, max_bytes, n_threads):
        """Yield the features of a read image in pieces (before RootSIFT and spatial
        augmentation)."""
        yield self._extract_raw(grey, n_threads)

    def n_descriptors(self, height, width):
        """``(n, exact)``: the number of descriptors of a ``height x width`` image (after
        ``max_side``) if known before extraction, ``exact`` False for an upper bound;
        ``(None, False)`` when unknown (sparse keypoints)."""
        return None, False

    def memory_estimate(self, height, width, decoded_pixels=None):
        """Bytes needed to extract one image whole: ``(output, scratch)``.

        ``output`` is what the returned :class:`LocalFeatures` hold (they live until they
        are encoded), ``scratch`` the transient peak while computing them, including the
        decoded image (``decoded_pixels``: pixels before ``max_side`` downscaling).
        Estimates from the algorithm's arrays, checked against measured peaks in the
        tests; used to size batches by a memory budget (:mod:`vladkit.pipeline.budget`).
        """
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------

    def _check_params(self):
        self._validate_params()
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.spatial_augmentation is not None:
            check_scale(self.spatial_augmentation, "spatial_augmentation")

    def _read(self, image):
        """The grey image, or None if it cannot be read and ``on_error="skip"``."""
        try:
            return read_image(image, mode="gray", max_pixels=self.max_pixels, max_side=self.max_side)
        except ImageReadError as error:
            if self.on_error != "skip":
                raise
            warnings.warn(f"skipped {error.path}: {error.reason}", ImageSkippedWarning, stacklevel=4)
            return None

    def _extract_one(self, image, n_threads=1):
        grey = self._read(image)
        if grey is None:
            return _empty_features(self._descriptor_dim, (0, 0))
        return self._finished(self._extract_raw(grey, n_threads))

    def _finished(self, features):
        """RootSIFT (``root``), then the positions appended (``spatial_augmentation``)."""
        if self.root:
            features = LocalFeatures(_root_sift_inplace(features.descriptors), features.positions,
                                     features.scales, features.image_shape)
        if self.spatial_augmentation is not None:
            features = augment_positions(features, self.spatial_augmentation)
        return features

    def _augmented_estimate(self, output, scratch):
        """``memory_estimate``'s (output, scratch) with spatial augmentation: each
        descriptor is 2 values longer, and made by a copy while the original is held."""
        if self.spatial_augmentation is None:
            return output, scratch
        return output + output * N_POSITION_DIMS // DESCRIPTOR_DIM, scratch + output

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        # X is a list of images: paths (strings), encoded bytes or pixel arrays; a 3-D
        # (n_images, height, width) array is a stack of grey images (as for scikit-learn's
        # PatchExtractor). Not a 2-D array of samples, so scikit-learn's data checks do
        # not apply.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        # The output is a list of LocalFeatures, not an array of the input's dtype.
        tags.transformer_tags.preserves_dtype = []
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
    spatial_augmentation : float or None, default=None
        Append each descriptor's normalised position, ``spatial_augmentation * (x / w -
        0.5, y / h - 0.5)`` for an ``h x w`` image, after RootSIFT: (n, 130) descriptors,
        the "spatially augmented" ones of Sanchez et al. 2012 (see
        :func:`vladkit.features.spatial_augmentation.augment_positions`; keep them out of a
        vocabulary's PCA with ``passthrough_dims=2``). None: plain descriptors.
    max_side : int or None, default=1024
        Downscale images whose long side is larger (see :func:`vladkit.features.images.read_image`;
        JPEGs are decoded directly at a reduced size). OpenCV's scale space costs ~240
        bytes per pixel: ~3 GB for a 12-megapixel photo, ~0.2 GB at 1024 x 768. None
        keeps full resolution.
    max_pixels : int or None
        Passed to :func:`vladkit.features.images.read_image`.
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
    [0, 255]. An image without keypoints (e.g. a constant one) gives a ``(0, 128)`` array
    (``(0, 130)`` with ``spatial_augmentation``).
    """

    def __init__(self, n_features=0, *, n_octave_layers=3, contrast_threshold=0.04,
                 edge_threshold=10.0, sigma=1.6, root=False, spatial_augmentation=None,
                 max_side=SIFT_MAX_SIDE, max_pixels=DEFAULT_MAX_PIXELS, on_error="raise", n_jobs=1):
        self.n_features = n_features
        self.n_octave_layers = n_octave_layers
        self.contrast_threshold = contrast_threshold
        self.edge_threshold = edge_threshold
        self.sigma = sigma
        self.root = root
        self.spatial_augmentation = spatial_augmentation
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

    _splits = False

    def memory_estimate(self, height, width, decoded_pixels=None):
        # OpenCV doubles the image, then keeps n_octave_layers + 3 Gaussian and
        # n_octave_layers + 2 difference-of-Gaussian float32 images per octave (each
        # octave a quarter of the one before: 4/3 in all).
        pixels = height * width
        layers = 2 * int(self.n_octave_layers) + 5
        scratch = int(4 * pixels * 4 * layers * 4 / 3) + _read_bytes(pixels, decoded_pixels)
        # Keypoints: one per 80-130 pixels on phone photos, counted as one per 50; each
        # 128 float32 + position + scale, plus OpenCV's KeyPoint object (~100 bytes).
        output = (pixels // 50 + 1) * (4 * DESCRIPTOR_DIM + 12 + 100)
        return self._augmented_estimate(output, scratch)

    def _extract_raw(self, grey, n_threads):
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
    number of descriptors of an ``h x w`` image is (see :func:`vladkit.features.dsift.dense_grid`)

        sum over s of  n(w, s) * n(h, s),
        n(L, s) = max(0, floor((L - 1 - floor(1.5 (max(sizes) - s)) - 3 s) / step) + 1)

    (with ``low_contrast="zero"``, the default). The algorithm is the dense one of
    ``vl_dsift`` (see :mod:`vladkit.features.dsift`), not a loop over keypoints.

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
    spatial_augmentation : float or None, default=None
        Append each descriptor's normalised position, ``spatial_augmentation * (x / w -
        0.5, y / h - 0.5)`` for an ``h x w`` image, after RootSIFT: (n, 130) descriptors,
        the "spatially augmented" ones of Sanchez et al. 2012 (see
        :func:`vladkit.features.spatial_augmentation.augment_positions`; keep them out of a
        vocabulary's PCA with ``passthrough_dims=2``). None: plain descriptors.
    max_side : int or None, default=640
        Downscale images whose long side is larger (see :func:`vladkit.features.images.read_image`;
        JPEGs are decoded directly at a reduced size). Dense SIFT's cost grows with the
        pixels: a 12-megapixel photo at full resolution is ~3 million descriptors (1.5
        GB); at 640 x 480, ~70,000. None keeps full resolution (then memory-bounded
        streaming extracts such an image in pieces, see :meth:`extract_pieces`).
    max_pixels : int or None
        Passed to :func:`vladkit.features.images.read_image`.
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

    def __init__(self, step=DENSE_STEP, sizes=DENSE_SIZES, *, contrast_threshold=0.005,
                 low_contrast="zero", smooth=True, root=False, spatial_augmentation=None,
                 max_side=DENSE_MAX_SIDE, max_pixels=DEFAULT_MAX_PIXELS, on_error="raise", n_jobs=1):
        self.step = step
        self.sizes = sizes
        self.contrast_threshold = contrast_threshold
        self.low_contrast = low_contrast
        self.smooth = smooth
        self.root = root
        self.spatial_augmentation = spatial_augmentation
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

    def _sizes(self):
        return [int(s) for s in np.atleast_1d(self.sizes)]

    def n_descriptors(self, height, width):
        n = sum(len(xs) * len(ys) for xs, ys in dense_grid(height, width, int(self.step), self._sizes()))
        return n, self.contrast_threshold is None or self.low_contrast == "zero"

    def memory_estimate(self, height, width, decoded_pixels=None):
        step, sizes, smooth = int(self.step), self._sizes(), bool(self.smooth)
        output = self.n_descriptors(height, width)[0] * BYTES_PER_DESCRIPTOR
        if self.contrast_threshold is not None and self.low_contrast == "drop":
            output *= 2  # the kept rows are copied out of the full grid
        scratch = (band_bytes(height, width, step, sizes, smooth, DEFAULT_BAND_BYTES)
                   + _read_bytes(height * width, decoded_pixels))
        return self._augmented_estimate(output, scratch)

    def _pieces(self, grey, max_bytes, n_threads):
        for descriptors, positions, bin_sizes, contrast in dense_sift_pieces(
                grey, step=int(self.step), sizes=self._sizes(), smooth=bool(self.smooth),
                max_bytes=max_bytes, n_threads=n_threads):
            yield self._features(grey, descriptors, positions, bin_sizes, contrast)

    def _extract_raw(self, grey, n_threads):
        descriptors, positions, bin_sizes, contrast = dense_sift(
            grey, step=int(self.step), sizes=self._sizes(), smooth=bool(self.smooth),
            n_threads=n_threads,
        )
        return self._features(grey, descriptors, positions, bin_sizes, contrast)

    def _features(self, grey, descriptors, positions, bin_sizes, contrast):
        """Apply the low-contrast rule to dense SIFT's output."""
        if self.contrast_threshold is not None:
            low = contrast < self.contrast_threshold
            if self.low_contrast == "zero":
                descriptors[low] = 0
            else:
                keep = ~low
                descriptors, positions, bin_sizes = descriptors[keep], positions[keep], bin_sizes[keep]
        return LocalFeatures(descriptors, positions, bin_sizes / np.float32(3), grey.shape)
