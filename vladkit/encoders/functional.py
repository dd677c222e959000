"""VLFeat's encoding functions, one descriptor set at a time: ``vlad_encode`` and
``fisher_encode``, with the arguments, flags and output layout of VLFeat's
``vl_vlad_encode`` / ``vl_fisher_encode`` (and of cyvlfeat's ``vlad`` / ``fisher``).

They run the estimators' own kernels (:class:`~vladkit.VLADEncoder`'s residual sums and
normalisations, :class:`~vladkit.FisherEncoder`'s accumulation), so they give what the
estimators give, and they keep float64: float64 in, float64 out.

Layouts are numpy's row-major ones: descriptors ``(N, D)``, words ``(K, D)``, assignments
``(N, K)``. VLFeat's column-major ``D x N`` / ``D x K`` / ``K x N`` matrices have exactly
this memory layout, and its ``D x K`` encoding is the row-major ``(K, D)`` block matrix
flattened: word after word, which is the order of the returned vectors.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse

from ._base import add_tasks, split_tasks, work_dtype
from .fisher import FisherEncoder
from .vlad import aggregate_residuals, exact_soft_residuals
from ..kernels.accumulate import accumulate_sparse
from ..vocabulary.gmm import GMMVocabulary
from ..vocabulary.arrays import _checked_arrays, _checked_gmm_arrays, _fitted_vocabulary

__all__ = ["fisher_encode", "vlad_encode"]


def _descriptors(X, dim):
    """X as an (N, dim) array of real finite numbers (not copied)."""
    X = np.asarray(X)
    if X.dtype.kind not in "fiu":
        raise TypeError(f"X must be an array of real numbers, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D (N, D) array with one descriptor per row, got shape {X.shape}")
    if X.shape[1] != dim:
        raise ValueError(f"X has {X.shape[1]} columns (dimensions) but the words have {dim}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or inf")
    return X


def _result_dtype(*arrays):
    """float32 if every array is float32 (VLFeat's VL_TYPE_FLOAT), else float64."""
    return np.dtype(np.float32) if all(a.dtype == np.float32 for a in arrays) else np.dtype(np.float64)


def vlad_encode(X, centers, assignments, *, unnormalized=False, normalize_components=False,
                square_root=False, normalize_mass=False):
    r"""VLAD encoding of one descriptor set given any assignment weights (VLFeat's
    ``vl_vlad_encode``).

    With descriptors :math:`x_i`, words :math:`c_k` and weights :math:`q_{ik}` (entries
    :math:`\le 0` are ignored, as VLFeat does):

    .. math::

        m_k = \sum_{i: q_{ik} > 0} q_{ik}, \qquad
        v_k = \sum_{i: q_{ik} > 0} q_{ik} (x_i - c_k)

    (:math:`v_k = 0` for a word with :math:`m_k = 0`), then, in VLFeat's order:

    1. ``normalize_mass``: :math:`v_k \leftarrow v_k / m_k`
       (``VL_VLAD_FLAG_NORMALIZE_MASS``);
    2. ``square_root``: :math:`v \leftarrow \operatorname{sign}(v) \sqrt{|v|}` element-wise
       (``VL_VLAD_FLAG_SQUARE_ROOT``);
    3. ``normalize_components``: :math:`v_k \leftarrow v_k / \max(\|v_k\|_2, 10^{-12})` per
       word (``VL_VLAD_FLAG_NORMALIZE_COMPONENTS``, "intra-normalisation");
    4. unless ``unnormalized``: :math:`v \leftarrow v / \max(\|v\|_2, 10^{-12})`
       (``VL_VLAD_FLAG_UNNORMALIZED`` turns this off).

    The sums are taken in float64 whatever the input (two BLAS products
    :math:`Q^T X - (Q^T 1) c` for dense weights, with the words where they cancel
    recomputed from the residuals; one pass over the non-zero weights for sparse ones),
    as :class:`~vladkit.VLADEncoder` does, then rounded once to the output dtype.

    Parameters
    ----------
    X : (N, D) array
        The descriptors, one per row (VLFeat's ``D x N`` data, column-major). N may be 0.
    centers : (K, D) array
        The words (VLFeat's ``D x K`` means).
    assignments : (N, K) array or scipy.sparse matrix/array
        Any weights: one-hot rows (hard assignment), k nearest words, soft assignment...
        (VLFeat's ``K x N`` assignments). Sparse input is never densified.
    unnormalized : bool, default=False
        Skip the final L2 normalisation (``VL_VLAD_FLAG_UNNORMALIZED``).
    normalize_components : bool, default=False
        L2-normalise each word's block (``VL_VLAD_FLAG_NORMALIZE_COMPONENTS``).
    square_root : bool, default=False
        Signed square root of every entry (``VL_VLAD_FLAG_SQUARE_ROOT``).
    normalize_mass : bool, default=False
        Divide each block by its word's mass :math:`m_k` (``VL_VLAD_FLAG_NORMALIZE_MASS``).

    Returns
    -------
    (K * D,) ndarray
        :math:`[v_1, \dots, v_K]`; float32 if X and centers are float32, float64
        otherwise (VLFeat's ``VL_TYPE_FLOAT`` / ``VL_TYPE_DOUBLE``).

    Raises
    ------
    ValueError
        Shapes that do not match (the message names the argument), NaN or inf.
    TypeError
        Non-numeric arrays.

    See Also
    --------
    vladkit.VLADEncoder : the estimator (computes the weights itself, many images).

    Examples
    --------
    >>> import numpy as np, vladkit
    >>> X = np.array([[1.0], [2.0], [3.0]])
    >>> vladkit.vlad_encode(X, np.zeros((3, 1)), np.eye(3), unnormalized=True)
    array([1., 2., 3.])
    """
    (centers,), _ = _checked_arrays([("centers", centers, 2)], None, None)
    n_words, dim = centers.shape
    X = _descriptors(X, dim)
    dtype = _result_dtype(X, centers)  # centers: float32 only if given as float32
    x = X.astype(np.float64)
    centers64 = centers.astype(np.float64)
    residuals = np.zeros((1, n_words, dim), dtype=np.float64)
    mass = np.zeros((1, n_words), dtype=np.float64)
    if scipy.sparse.issparse(assignments):
        neighbors, weights = _padded_rows(assignments, len(X), n_words)
        if len(X):
            tasks = split_tasks(np.array([[0, 0, len(X)]], dtype=np.int64))
            task_residuals = np.zeros((len(tasks), n_words, dim), dtype=np.float64)
            task_mass = np.zeros((len(tasks), n_words), dtype=np.float64)
            accumulate_sparse(x, neighbors, weights, centers64, tasks, task_residuals, task_mass)
            add_tasks(residuals, tasks, task_residuals)
            add_tasks(mass, tasks, task_mass)
    else:
        weights = _dense_weights(assignments, len(X), n_words)
        mass[0] = weights.sum(axis=0)
        residuals[0] = exact_soft_residuals(weights, x, centers64, mass[0])
    vector = aggregate_residuals(residuals, mass, normalize_mass, 0.5 if square_root else None,
                                 normalize_components, not unnormalized)
    return vector[0].astype(dtype)


def _check_assignments_shape(shape, n, n_words):
    if len(shape) != 2 or tuple(shape) != (n, n_words):
        raise ValueError(
            f"assignments has shape {tuple(shape)}, expected (N, K) = {(n, n_words)}: one row "
            "per descriptor of X, one column per word of centers"
        )


def _dense_weights(assignments, n, n_words):
    """Dense (N, K) weights in float64, entries <= 0 set to 0 (VLFeat ignores them)."""
    weights = np.asarray(assignments)
    if weights.dtype.kind not in "fiub":
        raise TypeError(f"assignments must be an array of real numbers, got dtype {weights.dtype}")
    _check_assignments_shape(weights.shape, n, n_words)
    weights = weights.astype(np.float64)  # a copy: clipped in place below
    if not np.all(np.isfinite(weights)):
        raise ValueError("assignments contains NaN or inf")
    np.maximum(weights, 0.0, out=weights)
    return weights


def _padded_rows(assignments, n, n_words):
    """A sparse (N, K) matrix as (N, m) word indices and float64 weights, m the largest
    number of stored entries of a row (padded with weight 0, which the kernel skips)."""
    _check_assignments_shape(assignments.shape, n, n_words)
    matrix = scipy.sparse.csr_matrix(assignments)  # a copy in CSR form, any input format
    if matrix.dtype.kind not in "fiub":
        raise TypeError(f"assignments must hold real numbers, got dtype {matrix.dtype}")
    matrix.sum_duplicates()
    values = matrix.data.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("assignments contains NaN or inf")
    counts = np.diff(matrix.indptr)
    width = max(int(counts.max(initial=0)), 1)
    rows = np.repeat(np.arange(n), counts)
    columns = np.arange(len(values)) - matrix.indptr[rows]
    neighbors = np.zeros((n, width), dtype=np.int64)
    weights = np.zeros((n, width), dtype=np.float64)
    neighbors[rows, columns] = matrix.indices
    weights[rows, columns] = values  # entries <= 0: skipped by the kernel, as VLFeat
    return neighbors, weights


def fisher_encode(X, means, covariances, priors, *, improved=False, normalized=False,
                  square_root=False, fast=False):
    r"""Fisher vector of one descriptor set (VLFeat's ``vl_fisher_encode``).

    For a diagonal GMM with priors :math:`\pi_k`, means :math:`\mu_k`, variances
    :math:`\sigma_k^2` and the N descriptors :math:`x_i`, with posteriors :math:`q_{ik}`
    (those below :math:`10^{-6}` dropped; components with :math:`\pi_k < 10^{-6}` skipped,
    their blocks left at 0, as VLFeat):

    .. math::

        u_k = \frac{1}{N \sqrt{\pi_k}} \sum_i q_{ik} \frac{x_i - \mu_k}{\sigma_k},
        \qquad
        v_k = \frac{1}{N \sqrt{2 \pi_k}} \sum_i q_{ik}
              \left[\left(\frac{x_i - \mu_k}{\sigma_k}\right)^2 - 1\right]

    (element-wise over the D dimensions); the encoding is
    :math:`z = [u_1, \dots, u_K, v_1, \dots, v_K]`, then:

    1. ``square_root``: :math:`z \leftarrow \operatorname{sign}(z) \sqrt{|z|}`
       (``VL_FISHER_FLAG_SQUARE_ROOT``);
    2. ``normalized``: :math:`z \leftarrow z / \max(\|z\|_2, 10^{-12})`
       (``VL_FISHER_FLAG_NORMALIZED``).

    ``improved`` is both (``VL_FISHER_FLAG_IMPROVED``, the "improved Fisher vector" of
    Perronnin, Sanchez & Mensink 2010). ``fast`` replaces each descriptor's posteriors by
    1 for its most probable component and 0 elsewhere (``VL_FISHER_FLAG_FAST``). An empty
    set (N = 0) gives zeros.

    Computed by :class:`~vladkit.FisherEncoder`'s accumulation (posteriors in the input's
    precision, sums in float64), so it equals the estimator's output.

    Parameters
    ----------
    X : (N, D) array
        The descriptors, one per row (VLFeat's ``D x N`` data). N may be 0.
    means : (K, D) array
    covariances : (K, D) array
        The diagonal variances :math:`\sigma_k^2`, all > 0.
    priors : (K,) array
        The mixture weights :math:`\pi_k`, all >= 0. As in VLFeat they need not sum to 1:
        the posteriors are normalised whatever their sum, and each block is scaled by
        :math:`1/\sqrt{\pi_k}` as given. (:meth:`GMMVocabulary.from_parameters`, which
        makes a vocabulary for the estimator, insists on a sum of 1.)
    improved : bool, default=False
        ``square_root`` and ``normalized`` (``VL_FISHER_FLAG_IMPROVED``).
    normalized : bool, default=False
        Final L2 normalisation (``VL_FISHER_FLAG_NORMALIZED``).
    square_root : bool, default=False
        Signed square root (``VL_FISHER_FLAG_SQUARE_ROOT``).
    fast : bool, default=False
        Hard posteriors (``VL_FISHER_FLAG_FAST``).

    Returns
    -------
    (2 * K * D,) ndarray
        :math:`[u_1 .. u_K, v_1 .. v_K]`; float32 if X and the three GMM arrays are
        float32, float64 otherwise.

    Raises
    ------
    ValueError
        Shapes that do not match, NaN or inf, a variance <= 0 or a negative prior (the
        message names the argument).
    TypeError
        Non-numeric arrays.

    See Also
    --------
    vladkit.FisherEncoder : the estimator (many images, optional PCA, weight gradients).
    """
    words, _ = _checked_gmm_arrays(means, covariances, priors, weights_name="priors",
                                   weights_sum_tolerance=math.inf)
    X = _descriptors(X, words["means_"].shape[1])
    dtype = _result_dtype(X, words["means_"])  # float32 only if all three were given as float32
    vocabulary = _fitted_vocabulary(GMMVocabulary, words, None, None)
    encoder = FisherEncoder(vocabulary=vocabulary, improved=improved,
                            power=0.5 if square_root else None, l2=normalized, fast=fast,
                            pca=None)
    # What FisherEncoder.fit does for a fitted vocabulary, without naming its 2 K D
    # output features (which costs more than encoding a small set).
    encoder._validate_params()
    encoder.vocabulary_ = vocabulary
    encoder._fit_encoding([X])
    with encoder._thread_limits():
        accumulation = encoder._accumulate(1, work_dtype([X.astype(dtype, copy=False)],
                                                         encoder._float32_limit))
        accumulation.add(0, X)
        return accumulation.finish(dtype=dtype)[0]
