"""The ASMK encoder's assignment kernels: each descriptor's m nearest words from its
products with the words, then (for one image at a time) its aggregated signatures.

Each row's products x.c come from BLAS, a block of rows at a time; its
``m + EXTRA_CANDIDATES`` smallest scores ||c||^2 - 2 x.c are then found in one pass over
its K products and ranked again in float64 (:func:`~vladkit.kernels.nearest.exact_nearest`'s
arithmetic), nearest first: the words a faiss ``IndexFlatL2`` search for candidates
followed by the same float64 ranking gave, without faiss's heap of k results. The
aggregation is :func:`~vladkit.kernels.asmk.aggregate_image`'s (the reference package's
arithmetic), with the MATLAB original's median thresholds as an option.
"""

import numpy as np
from numba import njit, prange

from ._flags import _FAST
from .asmk import aggregate_image, first_of_its_word, normalize_signatures, pack_signs
from .nearest import _k_smallest, _nearest_in_float64, _rank_candidates, _within_reach
from .products import _block


@njit(cache=True, nogil=True, fastmath=_FAST)
def _nearest_word(x, products, centers_sqnorm, centers64, constants):
    """The float64 nearest word of x (ties: the lower word), from its products: as
    :func:`~vladkit.kernels.nearest.nearest_word` (the argmin b of the computed
    s~_k = ||c_k||^2 - 2 x.c_k, decided again in float64 among the words whose s~_k is
    within 2 E + 2 E' of s~_b when there are others), with s~_k rounded to the products'
    dtype, which the bound E of :func:`~vladkit.kernels.nearest._rounding_bound` covers
    (it counts the rounding of the subtraction), so that the two passes over the K
    values are vectorised: their minimum, then how many are within reach. The first word
    reaching the minimum is found only when no other is within reach."""
    n_words = products.shape[0]
    low = centers_sqnorm[0] - (products[0] + products[0])
    for k in range(1, n_words):
        low = min(low, centers_sqnorm[k] - (products[k] + products[k]))
    top = _within_reach(x, low, constants)
    near = 0
    for k in range(n_words):
        near += not (np.float64(centers_sqnorm[k] - (products[k] + products[k])) > top)
    if near > 1:
        return _nearest_in_float64(x, products, centers_sqnorm, centers64, top)[0]
    for k in range(n_words):
        if centers_sqnorm[k] - (products[k] + products[k]) == low:
            return k
    return 0  # (not reached: the minimum is one of the values)


@njit(cache=True, nogil=True)
def nearest_rows(X, products, centers_sqnorm, centers64, constants, n_candidates, neighbors):
    """Each row's m = ``neighbors.shape[1]`` nearest words in float64, nearest first (ties:
    the lower word), from its products, in this thread. m = 1: :func:`_nearest_word`;
    m > 1: the ``n_candidates`` smallest scores (:func:`~vladkit.kernels.nearest._k_smallest`) ranked again in
    float64 (:func:`~vladkit.kernels.nearest._rank_candidates`).

    Parameters
    ----------
    X : (n, D) float32 or float64, the rows
    products : (n, K) X's dtype, X C^T (any summation order)
    centers_sqnorm : (K,) X's dtype, ||c||^2
    centers64 : (K, D) float64, the words
    constants : :func:`~vladkit.kernels.nearest.nearest_constants` of X's dtype
    n_candidates : int, ``candidate_count(m, K)``
    neighbors : (n, m) int64, out
    """
    values = np.empty(n_candidates, dtype=products.dtype)
    candidates = np.empty(n_candidates, dtype=np.int64)
    exact = np.empty(n_candidates)
    index = np.empty(n_candidates, dtype=np.int64)
    k = neighbors.shape[1]
    for i in range(X.shape[0]):
        if k == 1:
            neighbors[i, 0] = _nearest_word(X[i], products[i], centers_sqnorm, centers64, constants)
            continue
        _k_smallest(products[i], centers_sqnorm, values, candidates)
        _rank_candidates(X[i], centers64, candidates, k, exact, index)
        for j in range(k):
            neighbors[i, j] = index[j]


@njit(cache=True, nogil=True, parallel=True)
def nearest_in_blocks(X, centers_t, centers_sqnorm, centers64, constants, n_candidates, block, neighbors):
    """:func:`nearest_rows` of every row, in parallel over blocks of ``block`` rows: each
    task makes its block's products X_block C^T by BLAS (numba calls scipy's; one BLAS
    thread per task is the caller's to set, :func:`~vladkit._util.threads.kernel_threads`)
    and ranks its rows. ``centers_t``: (D, K), X's dtype."""
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        products = np.dot(X[start:end], centers_t)
        nearest_rows(X[start:end], products, centers_sqnorm, centers64, constants, n_candidates,
                     neighbors[start:end])


@njit(cache=True, nogil=True)
def aggregate_signatures(X, assignments, centers, binary, medians, signatures, words):
    """One image's signatures: the residuals summed per word V_c
    (:func:`~vladkit.kernels.asmk.aggregate_image`, the reference's arithmetic), then

    * binary, ``medians`` with no rows: the sign bits [V_c > 0];
    * binary, ``medians`` (K, D): the MATLAB original's bits [V_c / n_c > t_c], n_c the
      image's descriptors assigned to c and t_c = ``medians[c]``, written as
      [V_c - n_c t_c > 0] (the same bits: n_c > 0);
    * float: V_c / (||V_c|| + 1e-6) (:func:`~vladkit.kernels.asmk.normalize_signatures`).

    ``signatures``: (n * m, ceil(D / 8)) uint8 or (n * m, D) float32, out; ``words``:
    (n * m,) int64, out. Returns the number of distinct words (the rows written).
    """
    n, m = assignments.shape
    sums = np.empty((n * m, X.shape[1]), dtype=X.dtype)
    count = aggregate_image(X, assignments, centers, sums, words)
    if binary:
        if medians.shape[0]:
            counts = np.zeros(count, dtype=np.int64)
            for i in range(n):
                for a in range(m):
                    if first_of_its_word(assignments, i, a):  # counted once per word, as it is summed
                        counts[np.searchsorted(words[:count], assignments[i, a])] += 1
            # In float64: n_c t_c is not rounded again to X's dtype before the comparison.
            shifted = np.empty((count, X.shape[1]))
            for t in range(count):
                for d in range(X.shape[1]):
                    shifted[t, d] = np.float64(sums[t, d]) - counts[t] * np.float64(medians[words[t], d])
            pack_signs(shifted, signatures[:count])
            return count
        pack_signs(sums[:count], signatures[:count])
    else:
        unit = np.empty((count, X.shape[1]), dtype=X.dtype)
        normalize_signatures(sums[:count], unit)
        for t in range(count):
            for d in range(X.shape[1]):
                signatures[t, d] = unit[t, d]
    return count


@njit(cache=True, nogil=True, parallel=True)
def aggregate_all(X, offsets, assignments, centers, binary, medians, signatures, words, counts):
    """:func:`aggregate_signatures` of every image, in parallel over images: image i is rows
    ``offsets[i]:offsets[i + 1]``; its signatures and words are written from row
    ``offsets[i] * m``, their number into ``counts[i]``."""
    m = assignments.shape[1]
    for i in prange(offsets.shape[0] - 1):
        first, end = offsets[i], offsets[i + 1]
        counts[i] = aggregate_signatures(X[first:end], assignments[first:end], centers, binary, medians,
                                         signatures[first * m:end * m], words[first * m:end * m])


@njit(cache=True, nogil=True)
def rank_candidate_rows(X, centers64, candidates, neighbors):
    """:func:`~vladkit.kernels.nearest.exact_nearest` in this thread (a query's few rows):
    each row's ``neighbors.shape[1]`` nearest of its ``candidates``, ranked in float64."""
    m = candidates.shape[1]
    score = np.empty(m)
    index = np.empty(m, dtype=np.int64)
    for i in range(X.shape[0]):
        _rank_candidates(X[i], centers64, candidates[i], neighbors.shape[1], score, index)
        for j in range(neighbors.shape[1]):
            neighbors[i, j] = index[j]
