"""Matrix products on numba's threads, a block of rows per task, and the helpers of the
blocked kernels (block sizes, their operands, row norms).

Descriptor-to-word work (distances, GMM log-likelihoods), where the N x K x D multiply-adds
go, runs on numba's threads alone, in blocks of rows (:func:`block_rows`): each thread makes
its block's matrix product by BLAS (``sgemm`` runs several times faster than a C loop: see
ARCHITECTURE.md, "Speed model") and finishes the block (arg-min, k smallest, ...) while its
products are still in cache. BLAS must then run on one thread
(``vladkit._util.threads.kernel_threads``, which every encoder enters): one thread pool, whatever
was imported first (issue 30). No (N, K) matrix is held but the outputs that are one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


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


def squared_norms(X):
    """Row-wise squared L2 norms, accumulated in X's dtype."""
    return np.einsum("ij,ij->i", X, X)
