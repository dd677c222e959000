"""The encoders' fused kernels: a block of rows projected, assigned and aggregated in
one pass, on numba's threads alone (no scikit-learn, only :mod:`vladkit.kernels`).

An encoder's work on a chunk of rows used to be a sequence of whole-chunk steps (the
PCA projection, the (rows, K) products by BLAS, the assignment, the sums), each a pass
over memory and each a switch between BLAS's thread pool and numba's. Here a task (a
piece of one image: see ``encoders._base.split_tasks``) walks its rows in blocks of
:func:`~vladkit.kernels.products.block_rows`; each block's matrix products are made by BLAS in
the task's thread (BLAS single-threaded: ``vladkit._util.threads.kernel_threads``) and the
block is assigned and summed while it is in cache. Task t accumulates into row t of the
outputs, so tasks share nothing; the caller adds each image's tasks together.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._flags import _FAST
from .nearest import nearest_word
from .products import _block


# ------------------------------------------------------------------------ hard VLAD


@njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def vlad_hard(X, centers, centers_t, centers_sqnorm, centers64, constants, tasks, block, residuals, mass):
    """residuals[t, k] += x_i - c_k and mass[t, k] += 1 for each row i of task t whose
    float64 nearest word is k (:func:`~vladkit.kernels.nearest.nearest_word`).

    Summing residuals (rather than sum x_i - m_k c_k) avoids the cancellation that makes
    the latter pure round-off when c_k is close to the mean of its descriptors.

    Parameters
    ----------
    X : (n, D) float32 or float64
    centers : (K, D), X's dtype; centers_t its (D, K) transpose, C-contiguous
    centers_sqnorm : (K,) X's dtype
    centers64 : (K, D) float64, the exact words
    constants : :func:`~vladkit.kernels.nearest.nearest_constants`
    tasks : (T, 3) int64 (image, first row, end row)
    block : int, rows per BLAS product
    residuals : (T, K, D) float64, mass : (T, K) float64, accumulated into
    """
    for t in prange(tasks.shape[0]):
        first, end = tasks[t, 1], tasks[t, 2]
        for b in range((end - first + block - 1) // block):
            start, stop = _block(b, block, end - first)
            rows = X[first + start:first + stop]
            products = np.dot(rows, centers_t)
            for i in range(rows.shape[0]):
                k = nearest_word(rows[i], products[i], centers_sqnorm, centers64, constants)[0]
                mass[t, k] += 1.0
                for d in range(rows.shape[1]):
                    residuals[t, k, d] += rows[i, d] - centers[k, d]


# ------------------------------------------------------------------- Fisher vectors


@njit(cache=True, nogil=True, parallel=True)
def fisher_statistics(X, pca_mean, pca_t, centre, coefficients, constants, threshold, cutoff, fast, tasks, block,
                      moments, mass):
    """Fisher statistics sum_i q_ik [y_i^2, y_i] and sum_i q_ik of each task's rows, with
    y = PCA(x) - ``centre`` in float64 and q VLFeat's posteriors.

    Per block of rows: the projection (x - mean) P^T by BLAS in X's dtype (as the
    vocabulary projects), the rows' features [y^2, y] in float64, their log-densities by
    one float64 BLAS product with the GMM's coefficients (centred on the mean of the
    means, the expansion cancels by ~(|y| / sigma)^2 ulps, ~1e-14 on RootSIFT: in float32
    its errors were 20-35x VLFeat float's), then per row the posteriors
    (:func:`_posteriors`) and the features added with those weights to their components'
    sums, a sparse loop: 13-24 of K = 64-256 components per RootSIFT descriptor keep a
    posterior, and the product Q^T [y^2, y] would multiply all K.

    Parameters
    ----------
    X : (n, D_in) float32 or float64
    pca_mean : (D_in,) X's dtype; pca_t : (D_in, D) X's dtype, the projection's transpose;
        of shapes (0,) and (0, 0) without PCA (then D = D_in)
    centre : (D,) float64, the mean of the GMM's means
    coefficients : (2D, K) float64, [-1/(2 s2_k), a_k / s2_k] with a_k = mu_k - centre
    constants : (K,) float64, the rest of the centred log-density (-inf for a component
        left out: prior below the threshold)
    threshold, cutoff : float, posteriors below ``threshold`` are dropped; components more
        than ``cutoff`` below a row's best log-density are left out of its softmax
    fast : bool, one-hot posteriors at the first most probable component (VLFeat's FAST)
    tasks : (T, 3) int64; block : int, rows per block
    moments : (T, K, 2D) float64, mass : (T, K) float64, accumulated into
    """
    dim = centre.shape[0]
    n_words = constants.shape[0]
    projecting = pca_t.shape[0] > 0
    for t in prange(tasks.shape[0]):
        first, end = tasks[t, 1], tasks[t, 2]
        centred = np.empty((block if projecting else 0, X.shape[1]), dtype=X.dtype)
        features = np.empty((block, 2 * dim))
        values = np.empty(n_words)
        scratch = np.empty(n_words)
        words = np.empty(n_words + 1, dtype=np.int64)
        for b in range((end - first + block - 1) // block):
            start, stop = _block(b, block, end - first)
            count = stop - start
            rows = X[first + start:first + stop]
            if projecting:
                _subtract(rows, pca_mean, centred)
                projected = np.dot(centred[:count], pca_t)
            else:
                projected = rows
            _centred_features(projected, centre, features)
            log_densities = np.dot(features[:count], coefficients)
            for i in range(count):
                kept = _posteriors(log_densities[i], constants, threshold, cutoff, fast, values, scratch)
                _nonzero(values, kept, words)
                for j in range(kept):
                    k = words[j]
                    mass[t, k] += values[k]
                    _add_scaled(moments[t, k], features[i], values[k])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _subtract(rows, mean, out):
    """out[:len(rows)] = rows - mean, in their dtype."""
    for i in range(rows.shape[0]):
        for d in range(rows.shape[1]):
            out[i, d] = rows[i, d] - mean[d]


@njit(cache=True, nogil=True, fastmath=_FAST)
def _centred_features(rows, centre, out):
    """out[:len(rows)] = [y^2, y] in float64, y = rows - centre."""
    dim = centre.shape[0]
    for i in range(rows.shape[0]):
        for d in range(dim):
            value = np.float64(rows[i, d]) - centre[d]
            out[i, d] = value * value
            out[i, dim + d] = value


@njit(cache=True, nogil=True)
def _posteriors(log_densities, constants, threshold, cutoff, fast, out, scratch):
    """VLFeat's posteriors of one row from its log-densities (less ``constants``, -inf
    for skipped components); returns how many are not 0.

    q_k = softmax_k(l_k); components more than ``cutoff`` below the best are left out
    (their posteriors, below exp(-margin) / K, fall under the threshold anyway, and the
    denominator changes by less than exp(-margin) relative); q_k < ``threshold`` becomes
    0 (not renormalised, as VLFeat); with ``fast``, one-hot at the first largest
    (VLFeat's FAST). A row whose components are all skipped gets zeros. The loops have
    no branch per component (which of 64-256 components fall within the cutoff or keep
    a posterior is unpredictable): every exponential is computed (:func:`_exp_rows`).
    """
    n_words = constants.shape[0]
    top = -math.inf
    for k in range(n_words):
        value = log_densities[k] + constants[k]
        out[k] = value
        top = value if value > top else top
    if top == -math.inf or fast:
        kept = 0
        for k in range(n_words):
            hit = kept == 0 and out[k] == top and top > -math.inf
            kept += hit
            out[k] = 1.0 if hit else 0.0
        return kept
    # (not out[k] > top - cutoff: for |top| > ~1e17 that floor rounds to top and every
    # score, the maximum included, would be dropped)
    for k in range(n_words):
        difference = out[k] - top
        out[k] = difference if difference > -cutoff else -cutoff
    _exp_rows(out, scratch)
    total = 0.0
    for k in range(n_words):
        value = out[k] if log_densities[k] + constants[k] - top > -cutoff else 0.0
        out[k] = value
        total += value
    inverse = 1.0 / total
    kept = 0
    for k in range(n_words):
        q = out[k] * inverse
        keep = q >= threshold
        out[k] = q if keep else 0.0
        kept += keep
    return kept


_LOG2E = 1.4426950408889634
_LN2_HIGH = 6.93147180369123816490e-01  # ln 2 to 32 bits: m ln2_high is exact
_LN2_LOW = 1.90821492927058770002e-10
_ROUNDING = 6755399441055744.0  # 1.5 2^52: x + it holds round(x) in its low bits
_ROUNDING_BITS = np.int64(0x4338000000000000)


@njit(cache=True, nogil=True, fastmath={"contract"})
def _exp_rows(x, scale):
    """In place: x = exp(x) for x in [-708, 0], within 1 ulp of libm's ``exp``, in loops
    LLVM vectorises (libm's is one call per value). exp(x) = 2^m e^r with m = round(x /
    ln 2) and |r| <= ln(2) / 2: e^r by its Taylor series to r^13 (the next term, below
    4e-18, is under half an ulp), 2^m built from its bits. ``scale``: scratch of x's
    length."""
    bits = scale.view(np.int64)
    for k in range(x.shape[0]):
        value = x[k]
        m = math.floor(value * _LOG2E + 0.5)
        r = (value - m * _LN2_HIGH) - m * _LN2_LOW
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        x[k] = p * r + 1.0
        scale[k] = m + (_ROUNDING + 1023.0)  # the bits of 1.5 2^52 + (m + 1023)
    for k in range(x.shape[0]):
        bits[k] = (bits[k] - _ROUNDING_BITS) << 52  # those of 2^m
    for k in range(x.shape[0]):
        x[k] *= scale[k]


@njit(cache=True, nogil=True)
def _nonzero(values, count, out):
    """out[:count] = the indices of the ``count`` nonzero values, in order, without a
    branch per value (``out`` has one more entry than ``values``)."""
    j = 0
    for k in range(values.shape[0]):
        out[j] = k
        j += values[k] != 0.0
    return j


@njit(cache=True, nogil=True, fastmath=_FAST)
def _add_scaled(out, values, q):
    """out += q values."""
    for j in range(values.shape[0]):
        out[j] += q * values[j]
