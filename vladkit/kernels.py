"""The hot loops, and nothing else (no scikit-learn, no other vladkit imports).

Two kinds of kernel live here:

* descriptor-to-word work (distances, GMM log-likelihoods), where the N x K x D
  multiply-adds go. These run on numba's threads alone, in blocks of rows
  (:func:`block_rows`): each thread makes its block's matrix product by BLAS (``sgemm``
  runs several times faster than a C loop: see ARCHITECTURE.md, "Speed model") and
  finishes the block (arg-min, k smallest, ...) while its products are still in cache.
  BLAS must then run on one thread (``vladkit._threads.kernel_threads``, which every
  encoder enters): one thread pool, whatever was imported first (issue 30). No (N, K)
  matrix is held but the outputs that are one;
* numba loops for what is not a matrix product. Every numba kernel is compiled with
  ``cache=True`` (a new process does not recompile) and ``nogil=True`` (vladkit's thread
  pools run them on all cores at once).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_TWO_PI = 2.0 * math.pi

# Let LLVM vectorise reductions and fuse multiply-adds; not "nnan"/"ninf": GMM scores hold
# -inf for skipped components, and those must compare correctly.
_FAST = {"reassoc", "contract", "nsz", "arcp"}

#: Scratch budget of one chunk of an (n, K) likelihood matrix, in elements.
CHUNK_ELEMENTS = 1 << 22

#: Products per block of rows of the blocked kernels (1 MB in float32: a block's
#: (rows, K) products stay in the cache of the core that made them).
BLOCK_ELEMENTS = 1 << 18


def _chunks(n_rows, n_words):
    step = max(64, CHUNK_ELEMENTS // max(n_words, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _rows_and_words(X, centers):
    """X and the words' (D, K) transpose, C-contiguous and of one dtype (numpy's
    promotion of the two, as ``X @ centers.T`` would compute): the blocked kernels'
    operands."""
    dtype = np.result_type(X.dtype, centers.dtype)
    return np.ascontiguousarray(X, dtype=dtype), np.ascontiguousarray(centers.T, dtype=dtype)


def block_rows(n_words):
    """Rows per block for products with ``n_words`` columns: ``BLOCK_ELEMENTS / K``,
    between 64 (a BLAS call must amortise packing the words) and 1024."""
    return int(min(1024, max(64, BLOCK_ELEMENTS // max(n_words, 1))))


@njit(cache=True, nogil=True)
def _block(index, block, n):
    """(first row, end row) of block number ``index`` of ``block`` rows among n."""
    start = index * block
    return start, min(start + block, n)


@njit(cache=True, nogil=True, parallel=True)
def _matmul_blocks(X, W, out, block):
    n = X.shape[0]
    for b in prange((n + block - 1) // block):
        start, end = _block(b, block, n)
        np.dot(X[start:end], W, out[start:end])


def matmul(X, W):
    """``X @ W`` on numba's threads: a BLAS product per block of rows, in the thread that
    owns the block (BLAS single-threaded: see the module's docstring).

    Parameters
    ----------
    X : (n, D) float32 or float64
    W : (D, M), cast to X's dtype

    Returns
    -------
    (n, M) X's dtype
    """
    X = np.ascontiguousarray(X)
    W = np.ascontiguousarray(W, dtype=X.dtype)
    out = np.empty((X.shape[0], W.shape[1]), dtype=X.dtype)
    if not out.size:
        return out
    if not X.shape[1]:
        out[:] = 0
        return out
    _matmul_blocks(X, W, out, block_rows(W.shape[1]))
    return out


# ------------------------------------------------------------- descriptor-to-word work


def squared_norms(X):
    """Row-wise squared L2 norms, accumulated in X's dtype."""
    return np.einsum("ij,ij->i", X, X)


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
    dim = x.shape[0]
    arg = 0
    low = centers_sqnorm[0] - 2 * products[0]
    for k in range(1, n_words):
        value = centers_sqnorm[k] - 2 * products[k]
        if value < low:
            low = value
            arg = k
    total = 0.0
    for d in range(dim):
        value = np.float64(x[d])
        total += value * value
    norm = math.sqrt(total)
    radius = constants[0]
    margin = 2.0 * (_rounding_bound(norm, radius, constants[1], constants[2], dim)
                    + _rounding_bound(norm, radius, constants[3], constants[4], dim))
    # s~_k <= s~_b + margin, compared in float64 (a float32 s~_k converts exactly);
    # 2^-52 |s~_b| more covers the rounding of this sum itself
    top = np.float64(low) + (margin + 2.220446049250313e-16 * abs(np.float64(low)))
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
    """out = the indices of the len(out) smallest ||c_k||^2 - 2 products[k], ascending
    (``values``: scratch of out's length): insertion into a sorted list of k, which most
    words skip at one compare."""
    k = out.shape[0]
    filled = 0
    for word in range(products.shape[0]):
        value = centers_sqnorm[word] - 2 * products[word]
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


def diagonal_gaussian_terms(means, variances, weights):
    """Coefficients that turn diagonal-Gaussian log-densities into one matrix product.

    log(pi_k N(x; mu_k, diag(s2_k))) = [x^2, x] . [-1/(2 s2_k), mu_k / s2_k] + c_k with
    c_k = log pi_k - D/2 log(2 pi) - 1/2 sum_d log s2_kd - 1/2 sum_d mu_kd^2 / s2_kd.

    Returns
    -------
    coefficients : (2D, K) float64, the matrix to multiply ``[x^2, x]`` by
    constants : (K,) float64, c_k (-inf where pi_k is 0)
    """
    means = np.asarray(means, np.float64)
    precisions = 1.0 / np.asarray(variances, np.float64)
    dim = means.shape[1]
    with np.errstate(divide="ignore"):
        log_weights = np.log(np.asarray(weights, np.float64))
    constants = (
        log_weights
        - 0.5 * dim * math.log(2 * math.pi)
        + 0.5 * np.log(precisions).sum(axis=1)
        - 0.5 * (means**2 * precisions).sum(axis=1)
    )
    coefficients = np.concatenate([-0.5 * precisions, means * precisions], axis=1).T
    return np.ascontiguousarray(coefficients), constants


def gaussian_features(X):
    """(n, 2D) ``[x^2, x]``, in X's dtype: the rows :func:`diagonal_gaussian_terms`'
    coefficients multiply."""
    n, dim = X.shape
    features = np.empty((n, 2 * dim), dtype=X.dtype)
    np.multiply(X, X, out=features[:, :dim])
    features[:, dim:] = X
    return features


def gaussian_log_densities(X, coefficients, constants=None):
    """(n, K) log(pi_k N(x_i; mu_k, s2_k)) from :func:`diagonal_gaussian_terms`, in X's
    dtype; without ``constants``, the part that depends on x only (add c_k later)."""
    out = matmul(gaussian_features(X), coefficients)
    if constants is not None:
        out += constants.astype(X.dtype, copy=False)
    return out


def log_posteriors(X, coefficients, constants):
    """(n, K) log posteriors log q_ik and (n,) log-likelihoods log sum_k pi_k N(x_i).

    q_ik = exp(l_ik - max_k l_ik) / sum_k exp(l_ik - max_k l_ik), the log-sum-exp being
    taken in float64 rows so that far-away descriptors still get finite posteriors.
    """
    n = X.shape[0]
    n_words = constants.shape[0]
    log_q = np.empty((n, n_words), dtype=X.dtype)
    log_likelihood = np.empty(n, dtype=np.float64)
    for rows in _chunks(n, n_words):
        block = gaussian_log_densities(X[rows], coefficients, constants).astype(np.float64)
        top = block.max(axis=1, keepdims=True)
        total = top[:, 0] + np.log(np.exp(block - top).sum(axis=1))
        log_q[rows] = block - total[:, None]
        log_likelihood[rows] = total
    return log_q, log_likelihood


# --------------------------------------------------------------------------- dense SIFT


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


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def softmax_rows(scores, offsets=None):
    """In place: each row of ``scores`` (+ ``offsets``, if given) becomes its softmax.

    Every weight is kept, however small: soft VLAD's mass normalisation divides by them.
    (Fisher vectors' thresholded posteriors are ``encoding_kernels._posteriors``'.)
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
