"""Soft assignment and codes: softmax weights over the nearest words (multiple assignment,
kernel codebook), NetVLAD's softmax over all words, and locality-constrained linear codes."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._flags import _FAST
from .nearest import candidate_count, exact_nearest, nearest_k_words
from .products import matmul, squared_norms


def knn_weights(X, centers, n_neighbors, alpha, centers_sqnorm=None, exact_centers=None):
    """The ``n_neighbors`` nearest words of each row and softmax weights over them.

    w_ij = exp(-alpha d_ij^2) / sum_j' exp(-alpha d_ij'^2) over the m nearest words j
    (Jegou et al.'s multiple assignment with alpha = 1 / (2 sigma^2); van Gemert et al.'s
    kernel codebook restricted to the m nearest). With m = 1 this is hard assignment.

    The m nearest are found as LLC's: m + 4 candidates by BLAS in X's dtype
    (:func:`nearest_k_words`, no (n, K) matrix outlives its chunk), ranked again in
    float64 (:func:`exact_nearest`), whose scores d^2 - ||x||^2 give the weights (a row
    constant does not change a softmax).

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D), X's dtype
    n_neighbors : int >= 1
    alpha : float
    centers_sqnorm : (K,), optional, precomputed ``squared_norms(centers)``
    exact_centers : (K, D) float64, optional
        The words before their cast to X's dtype (default: ``centers`` in float64).

    Returns
    -------
    neighbors : (n, m) int64, nearest first
    weights : (n, m) X's dtype, rows summing to 1
    """
    n_words = centers.shape[0]
    m = min(n_neighbors, n_words)
    if exact_centers is None:
        exact_centers = centers.astype(np.float64)
    candidates = nearest_k_words(X, centers, candidate_count(m, n_words), centers_sqnorm)
    neighbors = np.empty((X.shape[0], m), dtype=np.int64)
    nearest = np.empty((X.shape[0], m), dtype=np.float64)
    exact_nearest(X, exact_centers, candidates, neighbors, nearest)
    # Shift by the nearest distance: exp() cannot underflow to an all-zero row.
    weights = np.exp(-alpha * (nearest - nearest[:, :1]))
    weights /= weights.sum(axis=1, keepdims=True)
    # A weight float32 cannot represent is 0 in both precisions: with mass normalisation
    # any positive weight makes a full block, so float32 and float64 must agree on which.
    weights[weights < np.finfo(np.float32).tiny] = 0
    return neighbors, weights.astype(X.dtype)


def _shifted_distances(X, centers, centers_sqnorm=None):
    """||x - c_k||^2 - ||x||^2 = ||c_k||^2 - 2 x.c_k, (n, K).

    The row constant ||x||^2 changes neither the nearest words nor the softmax over them,
    and leaving it out keeps the differences between words exact for large x (with it,
    they drown in ||x||^2 from |x| ~ 1e4 in float32 and it overflows beyond ~1e19).
    """
    if centers_sqnorm is None:
        centers_sqnorm = squared_norms(centers)
    out = matmul(X, centers.T)
    out *= -2
    out += centers_sqnorm
    return out


def softmax_weights(X, centers, alpha, centers_sqnorm=None):
    """(n, K) NetVLAD soft assignment: softmax_k(-alpha ||x - c_k||^2) (Arandjelovic et al. 2016)."""
    scores = _shifted_distances(X, centers, centers_sqnorm)
    scores *= -alpha
    softmax_rows(scores)
    return scores


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def softmax_rows(scores, offsets=None):
    """In place: each row of ``scores`` (+ ``offsets``, if given) becomes its softmax.

    Every weight is kept, however small: soft VLAD's mass normalisation divides by them.
    (Fisher vectors' thresholded posteriors are ``kernels.encoding._posteriors``'.)
    """
    n, k = scores.shape
    for i in prange(n):
        row = scores[i]
        if offsets is not None:
            for j in range(k):
                row[j] += offsets[j]
        top = row[0]
        for j in range(1, k):
            if row[j] > top:
                top = row[j]
        total = 0.0
        for j in range(k):
            e = math.exp(row[j] - top)
            row[j] = e
            total += e
        inverse = 1.0 / total
        for j in range(k):
            row[j] *= inverse


# ------------------------------------------------------------------ LLC (locality-constrained)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def llc_codes(X, centers, neighbors, beta, weights):
    """Approximated locality-constrained linear codes (Wang et al., CVPR 2010) of the rows of X.

    For a row x, with B its k = ``neighbors.shape[1]`` nearest words (from
    :func:`exact_nearest`):

        z = B - 1 x^T (k x D),  C = z z^T + beta tr(z z^T) I,  w = C^-1 1 / (1^T C^-1 1)

    (``LLC_coding_appr.m`` of their code). w sums to 1 and may hold negative values.

    w does not change when z is scaled, so z is
    divided by a power of two near its largest value first: C can neither overflow nor
    underflow whatever the descriptors' magnitude. C + beta tr(C) I is positive definite
    unless tr(C) = 0 (x is each of its k words, possible only for k = 1 or repeated
    words): the weights are then uniform, 1 / k, the limit of w as z -> 0.

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D) float64 (the exact words, whatever X's dtype)
    neighbors : (n, k) int64, each row's k nearest words
    beta : float
    weights : (n, k) float64, out: their codes
    """
    n, dim = X.shape
    k = neighbors.shape[1]
    for i in prange(n):
        # 1. z = B - x, scaled by a power of two
        z = np.empty((k, dim))
        top = 0.0
        for j in range(k):
            for d in range(dim):
                value = centers[neighbors[i, j], d] - X[i, d]
                z[j, d] = value
                top = max(top, abs(value))
        if top > 0:
            scale = math.ldexp(1.0, -math.frexp(top)[1])
            for j in range(k):
                for d in range(dim):
                    z[j, d] *= scale
        # 2. C = z z^T + beta tr(C) I, and w = C^-1 1 normalised to sum 1
        C = np.empty((k, k))
        trace = 0.0
        for a in range(k):
            for b in range(a + 1):
                total = 0.0
                for d in range(dim):
                    total += z[a, d] * z[b, d]
                C[a, b] = total
                C[b, a] = total
            trace += C[a, a]
        for a in range(k):
            C[a, a] += beta * trace
        w = weights[i]
        if not (trace > 0 and _solve_ones_cholesky(C, w)):
            for j in range(k):
                w[j] = 1.0 / k
            continue
        total = 0.0
        for j in range(k):
            total += w[j]
        for j in range(k):
            w[j] /= total


@njit(cache=True, nogil=True)
def _solve_ones_cholesky(A, w):
    """w = A^-1 1 for a symmetric positive-definite (k, k) A, by Cholesky (A is
    overwritten by its factor L, lower triangle). False if A is not numerically positive
    definite (a pivot <= 0 or NaN); k is a handful, no BLAS call pays at that size."""
    k = A.shape[0]
    for j in range(k):
        pivot = A[j, j]
        for l in range(j):
            pivot -= A[j, l] * A[j, l]
        if not pivot > 0:
            return False
        pivot = math.sqrt(pivot)
        A[j, j] = pivot
        for r in range(j + 1, k):
            value = A[r, j]
            for l in range(j):
                value -= A[r, l] * A[j, l]
            A[r, j] = value / pivot
    for r in range(k):  # L y = 1
        value = 1.0
        for l in range(r):
            value -= A[r, l] * w[l]
        w[r] = value / A[r, r]
    for r in range(k - 1, -1, -1):  # L^T w = y
        value = w[r]
        for l in range(r + 1, k):
            value -= A[l, r] * w[l]
        w[r] = value / A[r, r]
    return True
