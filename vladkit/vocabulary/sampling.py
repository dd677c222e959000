"""Training samples of descriptors: :class:`DescriptorSampler`, a bounded, reproducible
sample drawn image by image, and how ``fit`` tells per-image sets from one pooled array.

A vocabulary is trained on a bounded sample of descriptors spread over the images, so a
dataset's descriptors never need to be in memory at once.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DescriptorSampler"]


def _descriptors_of(item, index):
    """The (n, D) descriptor array of one image: a LocalFeatures or an array."""
    descriptors = getattr(item, "descriptors", item)
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise ValueError(
            f"image {index}: descriptors must be a 2-D (n, D) array, got shape {descriptors.shape}"
        )
    if descriptors.dtype.kind not in "fiu":
        raise TypeError(f"image {index}: descriptors must be numeric, got dtype {descriptors.dtype}")
    return descriptors


class DescriptorSampler:
    """Draw a bounded, reproducible sample of descriptors, image by image.

    Each image contributes at most ``ceil(max_descriptors / n_images)`` descriptors (and at
    most ``max_per_image``), drawn without replacement by a generator seeded from
    ``(seed, image index)``, so the sample does not depend on the order or batching in
    which images arrive. Only the sample is kept: a dataset's descriptors never need to be
    in memory at once.

    Parameters
    ----------
    n_images : int
    max_descriptors : int
    max_per_image : int or None
    seed : int
    """

    def __init__(self, n_images, max_descriptors, max_per_image=None, seed=0):
        if n_images < 1:
            raise ValueError("no images to sample descriptors from")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.quota = math.ceil(max_descriptors / n_images)
        if max_per_image is not None:
            self.quota = min(self.quota, int(max_per_image))
        self.max_descriptors = int(max_descriptors)
        self.seed = int(seed)
        self._parts = {}
        self._dim = None

    def add(self, index, descriptors):
        """Take this image's share of ``descriptors`` ((n, D)); checks finiteness and D."""
        descriptors = _descriptors_of(descriptors, index)
        if not np.all(np.isfinite(descriptors)):
            raise ValueError(f"image {index}: descriptors contain NaN or inf")
        self.keep(index, descriptors[self.select(index, len(descriptors))])

    def keep(self, index, descriptors):
        """Keep image ``index``'s rows already drawn with :meth:`select` (or, piece by
        piece, :meth:`select_share`); checks finiteness and D."""
        descriptors = _descriptors_of(descriptors, index)
        if len(descriptors) and self._dim is None:
            self._dim = descriptors.shape[1]
        if len(descriptors) and descriptors.shape[1] != self._dim:
            raise ValueError(
                f"image {index}: descriptors have dimension {descriptors.shape[1]}, "
                f"earlier images {self._dim}"
            )
        if not np.all(np.isfinite(descriptors)):
            raise ValueError(f"image {index}: descriptors contain NaN or inf")
        self._parts[index] = descriptors

    def select(self, index, n_rows):
        """Sorted indices of the rows of image ``index`` (which has ``n_rows`` descriptors)
        that belong to the sample; the same for the same seed, whatever the order."""
        if n_rows <= self.quota:
            return np.arange(n_rows)
        rng = np.random.default_rng([self.seed, 0, index])
        return np.sort(rng.choice(n_rows, self.quota, replace=False))

    def select_share(self, index, piece, n_rows, fraction):
        """Rows of piece number ``piece`` of image ``index`` (``n_rows`` descriptors, about
        ``fraction`` of the image's): its share ``ceil(fraction * quota)`` of the quota.
        For images extracted in pieces whose total is not known in advance."""
        quota = math.ceil(min(fraction, 1.0) * self.quota)
        if n_rows <= quota:
            return np.arange(n_rows)
        rng = np.random.default_rng([self.seed, 2, index, piece])
        return np.sort(rng.choice(n_rows, quota, replace=False))

    def sample(self):
        """The pooled sample, (n, D), in image order; at most ``max_descriptors`` rows."""
        parts = [self._parts[i] for i in sorted(self._parts) if len(self._parts[i])]
        if not parts:
            raise ValueError(f"no descriptors in any of the {len(self._parts)} images")
        pooled = np.concatenate(parts)
        if len(pooled) > self.max_descriptors:
            rng = np.random.default_rng([self.seed, 1])
            pooled = pooled[np.sort(rng.choice(len(pooled), self.max_descriptors, replace=False))]
        return pooled


def _sets_or_pooled(X):
    """``(sets, None)`` for per-image descriptor sets (a list of LocalFeatures or of
    (n_i, D) arrays), ``(None, X)`` for one pooled (N, D) array-like (an array, a
    DataFrame, a sparse matrix, a list of rows), which scikit-learn's validation checks."""
    if hasattr(X, "shape") or hasattr(X, "__array__") or isinstance(X, (str, bytes)):
        return None, X
    items = list(X)
    if items and np.ndim(getattr(items[0], "descriptors", items[0])) <= 1:
        return None, items  # rows of numbers (or numbers): one array-like, not sets
    return items, None
