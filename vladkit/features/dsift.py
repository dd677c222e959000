"""Dense SIFT: SIFT descriptors on a regular grid, computed densely as VLFeat's ``vl_dsift``.

Describing grid points one by one through a sparse SIFT implementation recomputes the
same gradient histograms for every overlapping window (OpenCV: ~3 s for one 200x200
image at step 4 and four bin sizes). The dense algorithm (Vedaldi & Fulkerson, VLFeat
``dsift.c``) shares all of that work:

1. (PHOW) smooth the image with a Gaussian of sigma = sqrt((bin_size / magnif)^2 - 0.25),
   magnif = 6, i.e. the scale matching the bin size, less the image's assumed 0.5 blur;
2. gradient by central differences (one-sided at the border); its magnitude is split
   linearly between the two nearest of 8 orientation planes;
3. each plane is convolved with the separable triangular kernel (1 - |t| / bin_size),
   which is exactly SIFT's bilinear spatial binning, for every pixel at once;
4. a descriptor is read off the pooled planes at its 4x4 bin centres, weighted by a
   Gaussian window per bin (VLFeat's "flat window" with window size 1.5, as PHOW);
5. L2-normalise, clamp at 0.2, L2-normalise again (Lowe 2004).

Conventions shared with :class:`vladkit.SIFT` (OpenCV): element ``(row * 4 + col) * 8 + o``
holds spatial bin (row, col) of the 4x4 grid (row 0 at the top) and orientation bin ``o``,
angles counter-clockwise from the +x axis with y pointing *up* (bin o covers
[o, o+1) * 45 degrees); descriptors are scaled to L2 norm 512.
VLFeat measures angles with y pointing down, so its orientation bins run the other way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .._util.threads import ordered_map
from ..kernels.sift import orientation_planes, sample_sift_descriptors

__all__ = ["dense_grid", "dense_sift", "dense_sift_pieces"]

N_ORIENTATIONS = 8
N_SPATIAL = 4
DESCRIPTOR_DIM = N_ORIENTATIONS * N_SPATIAL * N_SPATIAL
DESCRIPTOR_SCALE = 512.0  # OpenCV's SIFT_INT_DESCR_FCTR
SMOOTHING_MAGNIF = 6.0  # PHOW: smoothing sigma = bin_size / magnif
WINDOW_SIZE = 1.5  # PHOW's Gaussian window, in bins
CLAMP = 0.2  # Lowe's clamp of normalised histogram entries


def dense_grid(height, width, step, sizes):
    """Frame origins of the dense grid, the same rule :func:`dense_sift` uses.

    For each bin size ``s`` the grid is offset by ``floor(1.5 * (max(sizes) - s))`` so that
    descriptors of every size share centres (VLFeat PHOW), and holds every frame whose
    4 x 4 bins fit inside the image:

        n_x(s) = floor((width - 1 - offset(s) - 3 s) / step) + 1   (0 if negative)

    and likewise n_y(s) with the height. The descriptor centre is ``origin + 1.5 s``.

    Returns
    -------
    list of (xs, ys) pairs of int arrays, one per size: the frame origins along each axis.
    """
    largest = max(sizes)
    grid = []
    for size in sizes:
        offset = int(math.floor(1.5 * (largest - size)))
        span = (N_SPATIAL - 1) * size
        xs = np.arange(offset, width - span, step, dtype=np.intp)
        ys = np.arange(offset, height - span, step, dtype=np.intp)
        grid.append((xs, ys))
    return grid


def _window_weights(size):
    """Per-bin Gaussian window (VLFeat's flat-window approximation, averaged over the bin)."""
    t = np.arange(-size + 1, size, dtype=np.float64)
    sigma = size * WINDOW_SIZE
    weights = np.empty(N_SPATIAL)
    for b in range(N_SPATIAL):
        delta = size * (b - 0.5 * (N_SPATIAL - 1))
        weights[b] = np.mean(np.exp(-0.5 * ((t - delta) / sigma) ** 2))
    return weights.astype(np.float32)


#: Bytes of scratch per pixel of a band at its peak: the orientation planes and the
#: pooled planes (float32, 8 each), and the smoothed strip (the float strip is freed
#: once smoothed, the planes once pooled; OpenCV filters with a ring of a few rows).
SCRATCH_BYTES_PER_PIXEL = 2 * 4 * N_ORIENTATIONS + 2 * 4
#: Bytes per descriptor handed out: 128 float32 values, the contrast, the centre and
#: the bin size (and the float64 centres they are computed from).
BYTES_PER_DESCRIPTOR = 4 * DESCRIPTOR_DIM + 4 + 8 + 4 + 16
#: Default working-memory bound of one band (the whole image for photos up to ~1 MP).
DEFAULT_BAND_BYTES = 64 << 20


@dataclass(frozen=True)
class _Band:
    """Grid rows ``ys`` (all columns ``xs``) of bin size ``size``, computed from image rows
    ``top:bottom``; its descriptors are rows ``first:first + len(xs) * len(ys)`` of the
    whole image's output."""

    size: int
    xs: np.ndarray
    ys: np.ndarray
    top: int
    bottom: int
    first: int

    def __len__(self):
        return len(self.xs) * len(self.ys)


def _smoothing_sigma(size, smooth):
    return math.sqrt(max((size / SMOOTHING_MAGNIF) ** 2 - 0.25, 0.0)) if smooth else 0.0


def _bands(height, width, step, sizes, smooth, max_bytes, with_descriptors):
    """Cut the dense grid into bands of grid rows, size by size in output order, each
    computed from a horizontal strip of the image whose scratch (and, with
    ``with_descriptors``, whose descriptors) fit in ``max_bytes`` (at least one grid row).

    A strip reaches ``margin`` rows beyond the rows its descriptors sample: the triangular
    pooling (size - 1), the central difference (1) and the Gaussian (its radius). Inside
    that margin every value equals the whole-image computation, since all three filters
    are local and the strip keeps the image's own top and bottom border.
    """
    first = 0
    for size, (xs, ys) in zip(sizes, dense_grid(height, width, step, sizes)):
        if len(xs) == 0 or len(ys) == 0:
            continue
        sigma = _smoothing_sigma(size, smooth)
        radius = int(math.ceil(4 * sigma)) if sigma > 0 else 0
        margin = size + 1 + radius
        span = (N_SPATIAL - 1) * size + 1  # image rows a descriptor samples
        per_image_row = width * SCRATCH_BYTES_PER_PIXEL
        per_grid_row = step * per_image_row + (len(xs) * BYTES_PER_DESCRIPTOR if with_descriptors else 0)
        fixed = (span + 2 * margin) * per_image_row
        rows = max(1, (max_bytes - fixed) // per_grid_row) if max_bytes is not None else len(ys)
        for start in range(0, len(ys), rows):
            band_ys = ys[start:start + rows]
            top = max(0, int(band_ys[0]) - margin)
            bottom = min(height, int(band_ys[-1]) + span + margin)
            band = _Band(size, xs, band_ys, top, bottom, first)
            first += len(band)
            yield band


def band_bytes(height, width, step, sizes, smooth, max_bytes=None, with_descriptors=False):
    """The largest working memory of one band of :func:`_bands` (what extracting an
    image in bands needs at once, per thread)."""
    largest = 0
    for band in _bands(height, width, step, sizes, smooth, max_bytes, with_descriptors):
        scratch = (band.bottom - band.top) * width * SCRATCH_BYTES_PER_PIXEL
        largest = max(largest, scratch + (len(band) * BYTES_PER_DESCRIPTOR if with_descriptors else 0))
    return largest


def _describe_band(image, band, smooth, descriptors, contrast):
    """Compute ``band``'s descriptors and contrast into the given (len(band), 128) and
    (len(band),) arrays."""
    strip = image[band.top:band.bottom]
    strip = strip.astype(np.float32) / np.float32(255) if strip.dtype == np.uint8 else strip.astype(np.float32)
    size = band.size
    sigma = _smoothing_sigma(size, smooth)
    if sigma > 0:
        radius = int(math.ceil(4 * sigma))
        strip = cv2.GaussianBlur(strip, (2 * radius + 1, 2 * radius + 1), sigma,
                                 borderType=cv2.BORDER_REPLICATE)
    planes = orientation_planes(strip, N_ORIENTATIONS)
    del strip
    triangle = ((size - np.abs(np.arange(-size + 1, size))) / size).astype(np.float32)
    pooled = cv2.sepFilter2D(planes, -1, triangle, triangle, borderType=cv2.BORDER_REPLICATE)
    del planes
    sample_sift_descriptors(
        pooled, band.xs, band.ys - band.top, size, N_SPATIAL,
        _window_weights(size), CLAMP, DESCRIPTOR_SCALE, descriptors, contrast,
    )
    # VLFeat's contrast, the quantity PHOW thresholds at 0.005: the descriptor's mass in
    # its units (its spatial kernel has unit area, i.e. ours / s^2) over the frame's area
    # in bins ((3 s + 1) / s)^2; together, our mass / (3 s + 1)^2.
    frame_side = (N_SPATIAL - 1) * size + 1
    contrast /= np.float32(frame_side**2)


def _band_frames(band):
    """Descriptor centres (x, y) and bin sizes of a band, in output order (y outer)."""
    centre_x, centre_y = np.meshgrid(band.xs + 1.5 * band.size, band.ys + 1.5 * band.size)
    positions = np.stack([centre_x.ravel(), centre_y.ravel()], axis=1).astype(np.float32)
    return positions, np.full(len(band), band.size, dtype=np.float32)


def _check_image(image):
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D grey array, got shape {image.shape}")
    return image if image.dtype == np.uint8 else image.astype(np.float32, copy=False)


def dense_sift(image, *, step=4, sizes=(4, 6, 8, 10), smooth=True, max_bytes=DEFAULT_BAND_BYTES,
               n_threads=1):
    """Dense SIFT descriptors of a grey image (see the module docstring for the algorithm).

    The image is processed one bin size at a time, in horizontal bands whose scratch
    (smoothed strip, orientation and pooled planes: ~72 bytes per pixel) fits in
    ``max_bytes``; the descriptors are written straight into the output, so the working
    memory beyond the output is one band per thread, whatever the image size.

    Parameters
    ----------
    image : ndarray (h, w), uint8 or float
        Grey image; uint8 is scaled to [0, 1], floats are taken as they are.
    step : int
        Grid step in pixels.
    sizes : sequence of int
        Spatial bin sizes in pixels (a descriptor covers 4 x 4 bins).
    smooth : bool
        Apply PHOW's per-size Gaussian pre-smoothing.
    max_bytes : int or None
        Scratch bound of one band (None: one band per size, the whole image).
    n_threads : int
        Bands computed in parallel (the kernels release the GIL).

    Returns
    -------
    descriptors : (n, 128) float32, L2 norm 512 (0 for a flat window)
    positions : (n, 2) float32, descriptor centres (x, y) in pixels
    bin_sizes : (n,) float32, the bin size of each descriptor
    contrast : (n,) float32, VLFeat's contrast measure (``vl_dsift``'s frame "norm"): the
        sum of the descriptor before normalisation (image values in [0, 1]) over
        (3 s + 1)^2; VLFeat PHOW treats descriptors under 0.005 as empty.
    """
    image = _check_image(image)
    height, width = image.shape
    bands = list(_bands(height, width, step, sizes, smooth, max_bytes, with_descriptors=False))
    n = sum(len(band) for band in bands)
    descriptors = np.empty((n, DESCRIPTOR_DIM), dtype=np.float32)
    contrast = np.empty(n, dtype=np.float32)
    positions = np.empty((n, 2), dtype=np.float32)
    bin_sizes = np.empty(n, dtype=np.float32)

    def describe(band):
        rows = slice(band.first, band.first + len(band))
        _describe_band(image, band, smooth, descriptors[rows], contrast[rows])
        positions[rows], bin_sizes[rows] = _band_frames(band)

    for _ in ordered_map(describe, bands, n_threads):
        pass
    return descriptors, positions, bin_sizes, contrast


def dense_sift_pieces(image, *, step=4, sizes=(4, 6, 8, 10), smooth=True, max_bytes=DEFAULT_BAND_BYTES,
                      n_threads=1):
    """:func:`dense_sift`, band by band: yields ``(descriptors, positions, bin_sizes,
    contrast)`` for consecutive runs of output rows, whose concatenation is
    :func:`dense_sift`'s result. A band's scratch and descriptors together fit in
    ``max_bytes`` (at least one grid row); ``n_threads`` bands are computed ahead in
    parallel, so at most ``n_threads + 1`` bands exist at once."""
    image = _check_image(image)
    height, width = image.shape

    def describe(band):
        descriptors = np.empty((len(band), DESCRIPTOR_DIM), dtype=np.float32)
        contrast = np.empty(len(band), dtype=np.float32)
        _describe_band(image, band, smooth, descriptors, contrast)
        return (descriptors, *_band_frames(band), contrast)

    yield from ordered_map(describe, _bands(height, width, step, sizes, smooth, max_bytes, True), n_threads)
