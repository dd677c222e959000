"""The encoders' aggregation kernels: per-task sums of residuals, weights, counts and products
over a chunk's rows, the pooling of sparse codes, each image's sum of its tasks, and the row
passes around them (a finiteness check, NetVLAD's input normalisation)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._flags import _FAST
from .products import _block


# ------------------------------------------------------------------ encoder aggregation
#
# The encoders stream descriptors in chunks of rows; a chunk holds consecutive images
# (a large image may be split over chunks). The kernels take ``tasks``, an (S, 3) int64
# array of (image, first row, end row) within the chunk, and accumulate task t into row t
# of their output arrays, so tasks run in parallel without sharing an accumulator; the
# caller adds the rows of each image's tasks together (see encoders._base.split_tasks).


def all_finite(X):
    """Whether every value of the 2-D array X is finite: numpy's ``isfinite`` without its
    boolean temporary, in one parallel pass."""
    if not X.size or X.dtype.kind in "iub":
        return True
    return not _count_non_finite(X)


@njit(cache=True, nogil=True, parallel=True)
def _count_non_finite(X):
    n = X.shape[0]
    block = 1024
    total = 0
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        count = 0
        for i in range(start, end):
            for d in range(X.shape[1]):
                value = X[i, d]
                count += (value - value) != 0  # NaN for NaN and +-inf; a count LLVM vectorises
        total += count
    return total


@njit(cache=True, nogil=True, parallel=True)
def task_products(A, B, tasks, out):
    """out[t] += A[rows]^T B[rows] for the rows (first, end) of each task t, by BLAS in the
    task's thread: per-image sums sum_i a_i b_i^T on numba's threads.
    A : (n, K); B : (n, D), A's dtype; tasks : (T, 3) int64; out : (T, K, D)."""
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        out[t] += np.dot(A[start:end].T, B[start:end])


@njit(cache=True, nogil=True)
def add_task_rows(target, images, values):
    """target[images[t]] += values[t] for every task t, the values of consecutive tasks of
    one image summed first (in task order), then added. One thread: a few tasks' sums are
    less work than waking the pool. target : (n_images, M); images : (T,) int64;
    values : (T, M)."""
    n_tasks, width = values.shape
    t = 0
    while t < n_tasks:
        last = t
        while last + 1 < n_tasks and images[last + 1] == images[t]:
            last += 1
        row = target[images[t]]
        for j in range(width):
            total = values[t, j]
            for u in range(t + 1, last + 1):
                total += values[u, j]
            row[j] += total
        t = last + 1


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def accumulate_hard(X, labels, centers, tasks, residuals, mass):
    """residuals[t, k] += x_i - c_k and mass[t, k] += 1 for each row i of task t with label k.

    Summing residuals (rather than sum x_i - m_k c_k) avoids the cancellation that makes
    the latter pure round-off when c_k is close to the mean of its descriptors.

    X : (n, D); labels : (n,) int64; centers : (K, D); residuals : (n_tasks, K, D);
    mass : (n_tasks, K) float64.
    """
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        for i in range(start, end):
            k = labels[i]
            mass[t, k] += 1.0
            for d in range(X.shape[1]):
                residuals[t, k, d] += X[i, d] - centers[k, d]


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def accumulate_sparse(X, neighbors, weights, centers, tasks, residuals, mass):
    """Weighted version of :func:`accumulate_hard` over a few words per row.

    neighbors, weights : (n, m); entries with weight <= 0 are ignored (VLFeat's rule).
    """
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        for i in range(start, end):
            for j in range(neighbors.shape[1]):
                w = weights[i, j]
                if w <= 0:
                    continue
                k = neighbors[i, j]
                mass[t, k] += w
                for d in range(X.shape[1]):
                    residuals[t, k, d] += w * (X[i, d] - centers[k, d])


@njit(cache=True, nogil=True, parallel=True)
def histogram_sparse(neighbors, weights, tasks, counts):
    """counts[t, k] += w for each (row, word, weight) of task t."""
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        for i in range(start, end):
            for j in range(neighbors.shape[1]):
                if weights[i, j] > 0:
                    counts[t, neighbors[i, j]] += weights[i, j]


@njit(cache=True, nogil=True, parallel=True)
def max_pool_sparse(neighbors, weights, tasks, maxima, hits):
    """maxima[t, k] = max(maxima[t, k], w) and hits[t, k] += 1 for each (row, word k,
    weight w) of task t, any sign of w: a word's maximum over the rows that code it, and
    how many do (the others code it 0, which the caller adds to the maximum)."""
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        for i in range(start, end):
            for j in range(neighbors.shape[1]):
                k = neighbors[i, j]
                hits[t, k] += 1
                if weights[i, j] > maxima[t, k]:
                    maxima[t, k] = weights[i, j]


@njit(cache=True, nogil=True, parallel=True)
def sum_pool_sparse(neighbors, weights, tasks, sums):
    """sums[t, k] += w for each (row, word k, weight w) of task t, any sign of w (unlike
    :func:`histogram_sparse`, which keeps positive weights only)."""
    for t in prange(tasks.shape[0]):
        start, end = tasks[t, 1], tasks[t, 2]
        for i in range(start, end):
            for j in range(neighbors.shape[1]):
                sums[t, neighbors[i, j]] += weights[i, j]


# ------------------------------------------------------------------------------- NetVLAD


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def normalize_rows(X, eps):
    """In place: each row x of X becomes x / sqrt(sum(x^2) + eps), the sum in float64
    (NetVLAD's input normalisation, MATLAB's "preL2"; no overflow for float32 rows)."""
    for i in prange(X.shape[0]):
        total = 0.0
        for d in range(X.shape[1]):
            value = float(X[i, d])
            total += value * value
        inverse = 1.0 / math.sqrt(total + eps)
        for d in range(X.shape[1]):
            X[i, d] = X[i, d] * inverse
