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

import cv2
import numpy as np

from .kernels import orientation_planes, sample_sift_descriptors

__all__ = ["dense_grid", "dense_sift"]

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


def _describe_size(image, size, xs, ys, smooth):
    if smooth:
        sigma = math.sqrt(max((size / SMOOTHING_MAGNIF) ** 2 - 0.25, 0.0))
        if sigma > 0:
            radius = int(math.ceil(4 * sigma))
            image = cv2.GaussianBlur(
                image, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REPLICATE
            )
    planes = orientation_planes(image, N_ORIENTATIONS)
    triangle = ((size - np.abs(np.arange(-size + 1, size))) / size).astype(np.float32)
    pooled = cv2.sepFilter2D(planes, -1, triangle, triangle, borderType=cv2.BORDER_REPLICATE)
    n = len(xs) * len(ys)
    descriptors = np.empty((n, DESCRIPTOR_DIM), dtype=np.float32)
    contrast = np.empty(n, dtype=np.float32)
    sample_sift_descriptors(
        pooled, xs, ys, size, N_SPATIAL,
        _window_weights(size), CLAMP, DESCRIPTOR_SCALE, descriptors, contrast,
    )
    # VLFeat's contrast, the quantity PHOW thresholds at 0.005: the descriptor's mass in
    # its units (its spatial kernel has unit area, i.e. ours / s^2) over the frame's area
    # in bins ((3 s + 1) / s)^2; together, our mass / (3 s + 1)^2.
    frame_side = (N_SPATIAL - 1) * size + 1
    contrast /= np.float32(frame_side**2)
    return descriptors, contrast


def dense_sift(image, *, step=4, sizes=(4, 6, 8, 10), smooth=True):
    """Dense SIFT descriptors of a grey image (see the module docstring for the algorithm).

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

    Returns
    -------
    descriptors : (n, 128) float32, L2 norm 512 (0 for a flat window)
    positions : (n, 2) float32, descriptor centres (x, y) in pixels
    bin_sizes : (n,) float32, the bin size of each descriptor
    contrast : (n,) float32, VLFeat's contrast measure (``vl_dsift``'s frame "norm"): the
        sum of the descriptor before normalisation (image values in [0, 1]) over
        (3 s + 1)^2; VLFeat PHOW treats descriptors under 0.005 as empty.
    """
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32, copy=False)
    height, width = image.shape
    blocks, contrasts, centres, bin_sizes = [], [], [], []
    for size, (xs, ys) in zip(sizes, dense_grid(height, width, step, sizes)):
        if len(xs) == 0 or len(ys) == 0:
            continue
        descriptors, contrast = _describe_size(image, size, xs, ys, smooth)
        blocks.append(descriptors)
        contrasts.append(contrast)
        centre_x, centre_y = np.meshgrid(xs + 1.5 * size, ys + 1.5 * size)
        centres.append(np.stack([centre_x.ravel(), centre_y.ravel()], axis=1))
        bin_sizes.append(np.full(len(xs) * len(ys), size, dtype=np.float32))
    if not blocks:
        empty = np.zeros(0, dtype=np.float32)
        return np.zeros((0, DESCRIPTOR_DIM), np.float32), np.zeros((0, 2), np.float32), empty, empty
    positions = np.concatenate(centres).astype(np.float32)
    return (np.concatenate(blocks), positions, np.concatenate(bin_sizes),
            np.concatenate(contrasts))

