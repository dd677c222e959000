"""The dense-SIFT kernels: an image's gradients split into orientation planes, and SIFT
descriptors read off the planes once spatially pooled."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


_TWO_PI = 2.0 * math.pi


@njit(cache=True, nogil=True)
def orientation_planes(image, n_orientations):
    """Gradient magnitude of each pixel split linearly between its two nearest orientations.

    Gradients are central differences (one-sided at the border, as ``numpy.gradient``);
    angles are counter-clockwise from +x with y pointing up (OpenCV's SIFT convention).

    Parameters
    ----------
    image : (h, w) float32
    n_orientations : int

    Returns
    -------
    (h, w, n_orientations) float32
    """
    height, width = image.shape
    planes = np.zeros((height, width, n_orientations), dtype=np.float32)
    bins_per_radian = n_orientations / _TWO_PI
    for y in range(height):
        for x in range(width):
            if height == 1:
                gy = 0.0
            elif y == 0:
                gy = image[1, x] - image[0, x]
            elif y == height - 1:
                gy = image[y, x] - image[y - 1, x]
            else:
                gy = 0.5 * (image[y + 1, x] - image[y - 1, x])
            if width == 1:
                gx = 0.0
            elif x == 0:
                gx = image[y, 1] - image[y, 0]
            elif x == width - 1:
                gx = image[y, x] - image[y, x - 1]
            else:
                gx = 0.5 * (image[y, x + 1] - image[y, x - 1])
            magnitude = math.sqrt(gx * gx + gy * gy)
            position = math.atan2(-gy, gx) * bins_per_radian  # y up: negate gy
            if position < 0.0:
                position += n_orientations
            lower = math.floor(position)
            upper_weight = position - lower
            b0 = int(lower) % n_orientations
            b1 = (b0 + 1) % n_orientations
            planes[y, x, b0] = (1.0 - upper_weight) * magnitude
            planes[y, x, b1] = upper_weight * magnitude
    return planes


@njit(cache=True, nogil=True)
def sample_sift_descriptors(pooled, xs, ys, size, n_spatial, window, clamp, scale, out, contrast):
    """Read SIFT descriptors off spatially pooled orientation planes and normalise them.

    Descriptor ``i = iy * len(xs) + ix`` has its bin (r, c) at pixel
    ``(ys[iy] + r*size, xs[ix] + c*size)`` of ``pooled`` and weight ``window[r]*window[c]``;
    element ``(r * n_spatial + c) * n_orientations + o``. Its sum before normalisation
    (the gradient "mass", VLFeat's contrast measure) goes to ``contrast``; it is then
    L2-normalised, clamped at ``clamp``, re-normalised and multiplied by ``scale``. A
    descriptor of norm 0 stays 0.

    Parameters
    ----------
    pooled : (h, w, n_orientations) float32
    xs, ys : int arrays, frame origins
    size : int, bin size in pixels
    n_spatial : int, bins per side
    window : (n_spatial,) float32
    clamp, scale : float
    out : (len(ys) * len(xs), n_spatial**2 * n_orientations) float32, written
    contrast : (len(ys) * len(xs),) float32, written
    """
    n_orientations = pooled.shape[2]
    eps = np.float32(1.1920929e-07)
    i = 0
    for iy in range(ys.shape[0]):
        for ix in range(xs.shape[0]):
            k = 0
            total = 0.0
            mass = 0.0
            for r in range(n_spatial):
                y = ys[iy] + r * size
                for c in range(n_spatial):
                    x = xs[ix] + c * size
                    weight = window[r] * window[c]
                    for o in range(n_orientations):
                        value = weight * pooled[y, x, o]
                        out[i, k] = value
                        total += value * value
                        mass += value
                        k += 1
            norm = math.sqrt(total)
            contrast[i] = mass
            inverse = 1.0 / (norm + eps)
            total = 0.0
            for k in range(out.shape[1]):
                value = min(out[i, k] * inverse, clamp)
                out[i, k] = value
                total += value * value
            factor = scale / (math.sqrt(total) + eps)
            for k in range(out.shape[1]):
                out[i, k] *= factor
            i += 1
