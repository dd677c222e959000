"""The nearest words of descriptors: each row's nearest word in float64 whatever its dtype,
the two nearest squared distances, and the k nearest ranked again in float64.

A block's products x.c come from BLAS in X's dtype (:mod:`vladkit.kernels.products`), summed
in an order that depends on the shape BLAS is given; the rows where that rounding could
change the answer are decided again in float64 (:func:`nearest_word`,
:func:`exact_nearest`), so a row gets the same words in any chunk or piece of an image.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._flags import _FAST
from .products import _block, _rows_and_words, block_rows, matmul, squared_norms


def nearest_words(X, centers, centers_sqnorm=None, with_distances=True):
    """Nearest center of each row of X: the float64 one, however BLAS blocks the rows.

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: the products x.c come from one matrix product
    per chunk in X's dtype, and a numba pass finds each row's minimum of ||c||^2 - 2 x.c
    (||x||^2 does not change the argmin). BLAS sums x.c in an order that depends on the
    shape it is given, so at a near tie an image encoded whole and in pieces could get
    different words: a row where another word comes within what rounding in any order can
    move (:func:`_rounding_bound`) is decided again in float64 among those words
    (:func:`nearest_word`). Every row thus gets the float64 nearest
    word, in any chunk or piece. The cost is one more read of each row and of its K values
    (measured here, 2 loaded cores: 4-20% of this function's time, K = 64 to 1000, most of
    it the extra pass over the K values); on dense RootSIFT of
    15-Scene, 0.13-0.25% of the rows are decided again.

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D), same dtype as X
    centers_sqnorm : (K,), optional, precomputed ``squared_norms(centers)`` (in X's dtype,
        or rounded to it once from float64)
    with_distances : bool
        Also return the squared distances (costs one more pass over X).

    Returns
    -------
    labels : (n,) int64, index of the nearest center in float64 (the first one on ties)
    distances : (n,) X's dtype, squared distance to it (clamped at 0 against round-off;
        from float64 on the rows decided again), or None
    """
    n, dim = X.shape
    if centers_sqnorm is None:
        centers_sqnorm = squared_norms(centers)
    labels = np.empty(n, dtype=np.int64)
    best = np.empty(n, dtype=X.dtype)
    exact = np.empty(n)  # float64 squared distances, of the doubtful rows only
    doubtful = np.empty(n, dtype=np.bool_)
    if n:
        centers64 = centers.astype(np.float64)
        X, centers_t = _rows_and_words(X, centers)
        _nearest_blocks(X, centers_t, centers_sqnorm, centers64,
                        nearest_constants(X.dtype, centers64), block_rows(len(centers)), labels, best, doubtful,
                        exact)
    if not with_distances:
        return labels, None
    distances = best + squared_norms(X)
    distances[doubtful] = exact[doubtful]
    return labels, np.maximum(distances, 0)


def nearest_constants(dtype, centers64):
    """The ``constants`` of :func:`nearest_word` for rows of ``dtype`` and these words:
    (max ||c||, gamma and tiny of the dtype, gamma and tiny of float64)."""
    dim = centers64.shape[1]
    radius = math.sqrt(float(squared_norms(centers64).max())) if len(centers64) else 0.0
    return np.array([radius, *rounding_constants(dtype, dim), *rounding_constants(np.float64, dim)])


@njit(cache=True, nogil=True, parallel=True)
def _nearest_blocks(X, centers_t, centers_sqnorm, centers64, constants, block, labels, best, doubtful, exact):
    """:func:`nearest_word` of every row, a block of rows per task: one BLAS product
    X_block C^T, then the rows of the block."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        products = np.dot(X[start:end], centers_t)
        for i in range(start, end):
            labels[i], best[i], doubtful[i], exact[i] = nearest_word(X[i], products[i - start], centers_sqnorm,
                                                                     centers64, constants)


def rounding_constants(dtype, dim):
    """(gamma_{D+2}, tiny) of a dtype for :func:`_rounding_bound`, rounded up by 1%."""
    info = np.finfo(dtype)
    u = float(info.eps) / 2  # unit round-off: 2^-24 (float32), 2^-53 (float64)
    if (dim + 2) * u >= 0.5:
        return math.inf, math.inf  # no bound: every row is decided in float64
    return 1.01 * (dim + 2) * u / (1 - (dim + 2) * u), 1.01 * float(info.tiny)


@njit(cache=True, nogil=True)
def _rounding_bound(norm, radius, unit, tiny, dim):
    """Largest error of a computed ||c||^2 - 2 x.c, for ||x|| = ``norm``, ||c|| <= ``radius``.

    Whatever the order of summation (any BLAS kernel or blocking, FMA or not), a D-term
    dot product in floating point is off by at most gamma_D sum_d |x_d c_d| <= gamma_D ||x||
    ||c||, gamma_D = D u / (1 - D u), u the unit round-off (Higham, Accuracy and Stability
    of Numerical Algorithms, 2nd ed., eq. 3.5: it holds for every order). ||c||^2 (einsum,
    another dot product, or float64 rounded once) is off by at most gamma_D ||c||^2, 2 x.c
    is exact, and the subtraction rounds once, by u (1 + gamma_D) of its operands: in all
    gamma_D (1 + u) + u <= gamma_{D+1} times ||c|| (||c|| + 2 ||x||). The float64 scores
    sum_d c_d (c_d - 2 x_d) of :func:`_nearest_in_float64` round c - 2x, each product and
    the sum: gamma_{D+2} sum_d |c_d| |c_d - 2 x_d|, the same form. ``unit`` is gamma_{D+2},
    for both. Underflow is not a relative error: results, products and inputs flushed to
    0 (denormals-are-zero) add at most ``tiny`` each, (D + 2) tiny (2 + ||x|| + ||c||) over
    the two dot products. ``unit`` and ``tiny`` come rounded up by 1%
    (:func:`rounding_constants`), which covers this bound's own rounding and that of the
    float64 norms it is given.
    """
    return unit * radius * (radius + 2.0 * norm) + (dim + 2) * tiny * (2.0 + norm + radius)


@njit(cache=True, nogil=True)
def _within_reach(x, low, constants):
    """The largest computed score s~_k = ||c_k||^2 - 2 x.c_k that may still hide the
    float64 nearest word, given the smallest one, ``low``: s~_b + 2 E + 2 E' (the
    rounding bounds of the norms and of the product, :func:`_rounding_bound`), compared in
    float64 (a float32 s~_k converts exactly), plus 2^-52 |s~_b| for this sum's own
    rounding."""
    dim = x.shape[0]
    total = 0.0
    for d in range(dim):
        value = np.float64(x[d])
        total += value * value
    norm = math.sqrt(total)
    radius = constants[0]
    margin = 2.0 * (_rounding_bound(norm, radius, constants[1], constants[2], dim)
                    + _rounding_bound(norm, radius, constants[3], constants[4], dim))
    return np.float64(low) + (margin + 2.220446049250313e-16 * abs(np.float64(low)))


@njit(cache=True, nogil=True, fastmath=_FAST)
def nearest_word(x, products, centers_sqnorm, centers64, constants):
    """The float64 nearest word of one row x, from its products x.c (in x's dtype).

    Returns (label, s~_b, decided again, exact): b = argmin_k s~_k, s~_k = ||c_k||^2 -
    2 x.c_k from ``products``; if another word's s~_k is within reach of s~_b, where the
    float64 argmin may be another word, the label is decided again in float64 among those
    words (:func:`_nearest_in_float64`), and ``exact`` is its float64 squared distance
    (0.0 otherwise).

    Let s_k be the exact ||c_k||^2 - 2 x.c_k, E the bound on |s~_k - s_k|
    (:func:`_rounding_bound`) and E' that of the float64 scores r_k. If every other word
    has s~_k - s~_b > 2 E + 2 E', then s_k - s_b > 2 E' and r_k > r_b: b is the float64
    argmin, as these products in any other summation order would find it. Else the
    float64 argmin k* has r_k* <= r_b, so s_k* <= s_b + 2 E' and s~_k* <= s~_b + 2 E + 2 E'
    (whichever rounding of s~ is compared): it is among the words that near. A row with
    NaN is decided again, every word near.

    ``constants``: :func:`nearest_constants`.
    """
    n_words = products.shape[0]
    arg = 0
    low = centers_sqnorm[0] - 2 * products[0]
    for k in range(1, n_words):
        value = centers_sqnorm[k] - 2 * products[k]
        if value < low:
            low = value
            arg = k
    top = _within_reach(x, low, constants)
    near = 0  # (a count, not a branch per word: LLVM vectorises it)
    for k in range(n_words):
        near += not (np.float64(centers_sqnorm[k] - 2 * products[k]) > top)
    if near > 1:  # (the argmin itself is always near)
        label, exact = _nearest_in_float64(x, products, centers_sqnorm, centers64, top)
        return label, low, True, exact
    return arg, low, False, 0.0


@njit(cache=True, nogil=True)
def _nearest_in_float64(x, products, centers_sqnorm, centers64, reach):
    """The first word of least float64 score ||c||^2 - 2 x.c among those whose score from
    ``products`` is not above ``reach``, and its squared distance ||x||^2 + score in float64.

    No fastmath: each score is summed in one fixed order, so a row gets the same scores
    whichever words are near it, in whatever chunk or piece of an image it comes."""
    arg = -1
    low = np.inf
    for k in range(products.shape[0]):
        if np.float64(centers_sqnorm[k] - 2 * products[k]) > reach:
            continue
        score = 0.0
        for d in range(x.shape[0]):
            value = centers64[k, d]
            score += value * (value - 2.0 * np.float64(x[d]))
        if arg < 0 or score < low:
            low = score
            arg = k
    total = 0.0
    for d in range(x.shape[0]):
        value = np.float64(x[d])
        total += value * value
    return arg, low + total


def squared_distances(X, centers, centers_sqnorm=None):
    """(n, K) squared Euclidean distances, by BLAS, clamped at 0 against round-off."""
    if centers_sqnorm is None:
        centers_sqnorm = squared_norms(centers)
    out = matmul(X, centers.T)
    out *= -2
    out += centers_sqnorm
    out += squared_norms(X)[:, None]
    return np.maximum(out, 0, out=out)


def two_nearest_squared_distances(X, centers, centers_sqnorm=None):
    """Squared distances of each row of X to its nearest and second-nearest center, by BLAS.

    Like :func:`nearest_words`, one matrix product per chunk of rows and a numba pass, so
    no (n, K) matrix is held for all rows at once. Soft assignment's sharpness is set from
    these two (NetVLAD's initialisation: alpha = -log(0.01) / mean(d_2^2 - d_1^2)).

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D), same dtype as X, K >= 2
    centers_sqnorm : (K,), optional, precomputed ``squared_norms(centers)``

    Returns
    -------
    (n, 2) X's dtype: d_1^2 <= d_2^2 (equal on ties), clamped at 0 against round-off
    """
    if centers.shape[0] < 2:
        raise ValueError(f"two nearest centers need at least 2 centers, got {centers.shape[0]}")
    if centers_sqnorm is None:
        centers_sqnorm = squared_norms(centers)
    out = np.empty((X.shape[0], 2), dtype=X.dtype)
    if len(X):
        _two_smallest_blocks(*_rows_and_words(X, centers), centers_sqnorm, block_rows(len(centers)), out)
    out += squared_norms(X)[:, None]
    return np.maximum(out, 0, out=out)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def _two_smallest_blocks(X, centers_t, centers_sqnorm, block, out):
    """out[i] = the two smallest values of ||c_k||^2 - 2 x_i.c_k, ascending."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        products = np.dot(X[start:end], centers_t)
        for i in range(start, end):
            first = np.inf
            second = np.inf
            for k in range(products.shape[1]):
                value = centers_sqnorm[k] - 2 * products[i - start, k]
                if value < first:
                    second = first
                    first = value
                elif value < second:
                    second = value
            out[i, 0] = first
            out[i, 1] = second


def nearest_k_words(X, centers, k, centers_sqnorm=None):
    """The ``k`` nearest centers of each row of X, nearest first, by BLAS.

    As :func:`nearest_words`: one matrix product per chunk of rows, then a numba pass
    keeps each row's ``k`` smallest values of ||c||^2 - 2 x.c. ||x||^2 changes no ranking,
    and leaving it out keeps the differences between words for large x (see
    :func:`_shifted_distances`). No (n, K) matrix outlives its chunk and no argpartition
    runs over it: k is small, K large. The ranking is in X's dtype: :func:`exact_nearest`
    ranks a few more candidates again in float64.

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D), same dtype as X
    k : int >= 1; at most K are returned
    centers_sqnorm : (K,), optional, precomputed ``squared_norms(centers)``

    Returns
    -------
    (n, min(k, K)) int64: word indices, nearest first (the lower index first on ties)
    """
    if centers_sqnorm is None:
        centers_sqnorm = squared_norms(centers)
    k = min(k, centers.shape[0])
    out = np.empty((X.shape[0], k), dtype=np.int64)
    if len(X) and k:
        _k_smallest_blocks(*_rows_and_words(X, centers), centers_sqnorm, block_rows(len(centers)), out)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _k_smallest_blocks(X, centers_t, centers_sqnorm, block, out):
    """out[i] = the indices of the out.shape[1] smallest ||c_k||^2 - 2 x_i.c_k, ascending."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        products = np.dot(X[start:end], centers_t)
        values = np.empty(out.shape[1], dtype=products.dtype)
        for i in range(start, end):
            _k_smallest(products[i - start], centers_sqnorm, values, out[i])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _k_smallest(products, centers_sqnorm, values, out):
    """out = the indices of the len(out) smallest ||c_k||^2 - (products[k] + products[k]),
    ascending (``values``: scratch of out's length): insertion into a sorted list of k,
    which most words skip at one compare.

    The doubling is a sum, not ``2 *``: exact either way, but an integer factor would
    promote float32 products to float64, where float32 products and norms keep the loop
    in float32 (vectorised; the ASMK encoder's candidates, :mod:`.asmk_words`)."""
    k = out.shape[0]
    filled = 0
    for word in range(products.shape[0]):
        value = centers_sqnorm[word] - (products[word] + products[word])
        if filled == k and not value < values[k - 1]:
            continue
        # strict comparisons: a word ties behind the lower indices already there
        j = filled if filled < k else k - 1
        while j > 0 and value < values[j - 1]:
            values[j] = values[j - 1]
            out[j] = out[j - 1]
            j -= 1
        values[j] = value
        out[j] = word
        if filled < k:
            filled += 1


#: Candidates ranked again exactly per row beyond the k wanted (:func:`exact_nearest`): a
#: float32 ranking misplaces a word by at most a few round-offs of ||c||^2 - 2 x.c, so the
#: true k nearest are among the k + 4 first unless five words tie that closely.
EXTRA_CANDIDATES = 4


def candidate_count(k, n_words):
    """How many candidates :func:`nearest_k_words` finds for :func:`exact_nearest`'s k."""
    return min(k + EXTRA_CANDIDATES, n_words)


@njit(cache=True, nogil=True, fastmath=_FAST)
def _rank_candidates(x, centers, candidates, k, score, index):
    """Put the k nearest of ``candidates`` to x first in ``index``, nearest first (ties:
    the lower word), with ``score`` = ||c||^2 - 2 x.c in float64 (the squared distance
    less ||x||^2). ``score`` and ``index`` are scratch of candidates' length."""
    m = candidates.shape[0]
    for j in range(m):
        word = candidates[j]
        total = 0.0
        for d in range(x.shape[0]):
            value = centers[word, d]
            total += value * (value - 2.0 * x[d])
        score[j] = total
        index[j] = word
    for j in range(k):
        best = j
        for l in range(j + 1, m):
            if score[l] < score[best] or (score[l] == score[best] and index[l] < index[best]):
                best = l
        score[j], score[best] = score[best], score[j]
        index[j], index[best] = index[best], index[j]


@njit(cache=True, nogil=True, parallel=True)
def exact_nearest(X, centers, candidates, neighbors, scores):
    """The k = ``neighbors.shape[1]`` nearest words of each row of X among its
    ``candidates`` (from :func:`nearest_k_words`, ``candidate_count(k, K)`` of them),
    ranked in float64: a near tie that float32 BLAS ranks wrongly would swap a word for
    another, a jump no rounding of the weights comes near.

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D) float64, the exact words whatever X's dtype
    candidates : (n, m) int64, m >= k, distinct words per row
    neighbors : (n, k) int64, out: nearest first (ties: the lower word)
    scores : (n, k) float64, out: ||c||^2 - 2 x.c of those words
    """
    n = X.shape[0]
    m = candidates.shape[1]
    k = neighbors.shape[1]
    for i in prange(n):
        score = np.empty(m)
        index = np.empty(m, dtype=np.int64)
        _rank_candidates(X[i], centers, candidates[i], k, score, index)
        for j in range(k):
            neighbors[i, j] = index[j]
            scores[i, j] = score[j]
