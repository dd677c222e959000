"""PCA whitening of image vectors (Jégou & Chum), as applied before indexing them.

:class:`PCAWhitening` is Jégou & Chum's post-processing of VLAD / Fisher / BoF vectors
(centre, project on the principal axes, divide by the square root of the variances,
L2-normalise). :class:`vladkit.retrieval.index.VectorIndex` applies it to every vector it
is given and saves it with the index (:mod:`vladkit.retrieval.index_files`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.decomposition import PCA
from sklearn.utils.validation import check_is_fitted, validate_data

from ..encoders.normalize import l2_normalize, power_normalize
from ..vocabulary.base import _check_positive_int

__all__ = ["PCAWhitening"]

#: Elements per chunk when projecting (bounds the centred copy of the input to 16 MB).
_CHUNK_ELEMENTS = 1 << 22
#: A principal variance below this fraction of the largest is treated as "no variance".
_DEGENERATE_VARIANCE = 1e-10


class PCAWhitening(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    r"""PCA whitening of image vectors, then L2 normalisation (Jégou & Chum, ECCV 2012).

    Jégou & Chum, "Negative evidences and co-occurrences in image retrieval: the benefit
    of PCA and whitening", ECCV 2012: each vector ``x`` (a VLAD, Fisher or BoF vector) is
    centred, projected on the ``n_components`` leading principal axes of the training
    vectors, each axis divided by the square root of its variance, and L2-normalised:

    .. math::

        y = \frac{\tilde y}{\lVert \tilde y \rVert_2}, \qquad
        \tilde y = \operatorname{diag}(\lambda_1 + \epsilon, \dots,
        \lambda_d + \epsilon)^{-1/2} \, P \, (x - \mu)

    with ``mu`` the training mean, ``P`` the ``(d, D)`` matrix of principal axes (rows)
    and ``lambda_i`` their variances. Whitening gives every direction the same weight,
    which down-weights the co-occurring (bursty) components that dominate the raw vectors.
    ``whiten=False`` drops the ``diag(...)^(-1/2)`` factor (plain PCA, then L2). With
    ``power``, the signed power ``sign(y) |y|^power`` follows, then L2 again.

    The PCA is fitted with scikit-learn's :class:`~sklearn.decomposition.PCA` in float64
    (memory: up to two float64 copies of the training set); the projection is applied in
    float32, in chunks. An all-zero input row (an image without descriptors) gives an
    all-zero output row; no output is ever NaN (norms are clamped at 1e-12).

    Parameters
    ----------
    n_components : int, default=128
        Output dimension ``d``; at most ``min(n_samples, n_features)`` of the training set.
        Whitening a direction with no variance in the training set (e.g. ``n_components``
        of ``n_samples`` or more: the centred data has rank ``n_samples - 1``) amplifies
        noise by ``1 / sqrt(eps)``; ``fit`` warns when that happens.
    whiten : bool or float, default=True
        True divides each component by ``sqrt(lambda_i + eps)`` (full whitening). A number
        ``a`` in (0, 0.5] divides by ``(lambda_i + eps)^a`` instead: partial whitening,
        which damps the amplification of the weakest components, estimated poorly from a
        small training set (``a = 0.25`` works well with a few hundred vectors, e.g. in
        ``vladkit demo``). False (or 0) is plain PCA.
    power : float or None, default=None
        Exponent of the signed power applied after the first L2 normalisation (0.5 is the
        signed square root), followed by a second L2 normalisation.
    eps : float, default=1e-9
        Added to every variance before the square root, so no division is by zero. The
        vectors are L2-normalised, so their variances are at most 1 and an absolute
        regulariser is meaningful.
    svd_solver : str, default="auto"
        Passed to scikit-learn's PCA. "full" and "covariance_eigh" are exact; "auto" may
        pick the (much faster, approximate) "randomized" solver for large inputs.
    random_state : int, RandomState or None, default=None
        Seeds the randomized and arpack solvers.

    Attributes
    ----------
    mean_ : (n_features,) float32 ndarray
        ``mu``.
    components_ : (n_components, n_features) float32 ndarray
        ``P``: unit principal axes, by decreasing variance; each axis' largest-magnitude
        entry is positive (deterministic signs).
    explained_variance_ : (n_components,) float64 ndarray
        ``lambda_i``.
    explained_variance_ratio_ : (n_components,) float64 ndarray
    projection_ : (n_components, n_features) float32 ndarray
        The matrix applied: ``diag(lambda + eps)^(-1/2) P`` (``P`` when not whitening).
    n_components_ : int
    n_features_in_ : int
    feature_names_in_ : ``(n_features_in_,)`` ndarray of str
        The column names, when fitted on a DataFrame whose column names are all strings.

    References
    ----------
    H. Jégou and O. Chum. Negative evidences and co-occurrences in image retrieval: the
    benefit of PCA and whitening. ECCV 2012.
    """

    def __init__(self, n_components=128, *, whiten=True, power=None, eps=1e-9,
                 svd_solver="auto", random_state=None):
        self.n_components = n_components
        self.whiten = whiten
        self.power = power
        self.eps = eps
        self.svd_solver = svd_solver
        self.random_state = random_state

    def _validate_params(self):
        _check_positive_int(self, "n_components")
        if not isinstance(self.whiten, (bool, np.bool_)) and not (
            isinstance(self.whiten, (int, float, np.number)) and 0 <= self.whiten <= 0.5
        ):
            raise ValueError(f"whiten must be True, False or an exponent in [0, 0.5], got {self.whiten!r}")
        if self.power is not None and not (
            isinstance(self.power, (int, float, np.number)) and not isinstance(self.power, bool)
            and np.isfinite(self.power) and self.power > 0
        ):
            raise ValueError(f"power must be a positive number or None, got {self.power!r}")
        if not (isinstance(self.eps, (int, float, np.number)) and not isinstance(self.eps, bool)
                and np.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")

    def fit(self, X, y=None):
        """Learn the mean, principal axes and variances of the training vectors.

        Parameters
        ----------
        X : (n_samples, n_features) array
            Training vectors (e.g. L2-normalised VLAD vectors), at least 2 of them.
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        # scikit-learn's validation (its messages for sparse, complex, 1-D, empty or
        # non-finite input; sets n_features_in_ and, for a DataFrame, feature_names_in_),
        # in float64 for an accurate PCA; a PCA needs 2 vectors.
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        n_samples, n_features = X.shape
        limit = min(n_samples, n_features)
        if self.n_components > limit:
            raise ValueError(
                f"n_components={self.n_components} exceeds min(n_samples, n_features) = "
                f"min({n_samples}, {n_features}) = {limit}: use at most {limit} components "
                "or more training vectors"
            )
        if np.all(X.min(axis=0) == X.max(axis=0)):
            raise ValueError("all training vectors are identical: there are no principal axes to learn")
        pca = PCA(n_components=int(self.n_components), svd_solver=self.svd_solver,
                  random_state=self.random_state)
        pca.fit(X)
        components = np.array(pca.components_, dtype=np.float64)
        # Deterministic signs whatever the solver and scikit-learn version: the
        # largest-magnitude entry of each axis positive (as KMeansVocabulary's PCA).
        rows = np.arange(len(components))
        components *= np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
        variances = np.maximum(np.asarray(pca.explained_variance_, dtype=np.float64), 0.0)
        if variances[0] == 0:
            raise ValueError("all training vectors are identical: there are no principal axes to learn")
        degenerate = np.flatnonzero(variances < _DEGENERATE_VARIANCE * variances[0])
        if self.whiten and len(degenerate):
            warnings.warn(
                f"{len(degenerate)} of the {len(variances)} principal components (from "
                f"component {degenerate[0]}) have no variance in the {n_samples} training "
                f"vectors; whitening multiplies them by up to 1/sqrt(eps) = "
                f"{1 / math.sqrt(self.eps) if self.eps else math.inf:.3g}, so they can dominate "
                "new vectors: use fewer components or more training vectors",
                UserWarning, stacklevel=2,
            )
        projection = components
        if self.whiten:
            exponent = 0.5 if self.whiten is True or isinstance(self.whiten, np.bool_) else float(self.whiten)
            with np.errstate(divide="ignore"):
                projection = components / ((variances + self.eps) ** exponent)[:, None]
            if not np.all(np.isfinite(projection)):
                raise ValueError("eps=0 and a component has zero variance: whitening would divide "
                                 "by zero; use eps > 0 or fewer components")
        self.mean_ = np.asarray(pca.mean_, dtype=np.float32)
        self.components_ = np.ascontiguousarray(components, dtype=np.float32)
        self.explained_variance_ = variances
        self.explained_variance_ratio_ = np.asarray(pca.explained_variance_ratio_, dtype=np.float64)
        self.projection_ = np.ascontiguousarray(projection, dtype=np.float32)
        self.n_components_ = int(self.components_.shape[0])
        return self

    def transform(self, X):
        """Whiten (or project) and L2-normalise; see the class docstring for the formula.

        Parameters
        ----------
        X : (n, n_features) array-like
            Computed in float32 (whatever the input's dtype); no NaN or inf.

        Returns
        -------
        (n, n_components) float32 ndarray
            Unit rows, or zero rows for all-zero inputs (and no rows for no input rows).
        """
        check_is_fitted(self, "projection_")
        # Cast to float32 before the finiteness check: float64 values beyond float32's
        # range become inf and are refused as such (not turned into NaN outputs).
        with np.errstate(over="ignore"):
            X = validate_data(self, X, reset=False, dtype=np.float32, order="C",
                              ensure_min_samples=0)
        return self._transform(X)

    def _transform(self, X):
        """:meth:`transform` for an already validated float32 C-contiguous X."""
        out = np.empty((len(X), self.n_components_), dtype=np.float32)
        projection_t = self.projection_.T
        step = max(1, _CHUNK_ELEMENTS // max(X.shape[1], 1))
        zero = np.empty(len(X), dtype=bool)
        for start in range(0, len(X), step):
            block = X[start:start + step]
            zero[start:start + step] = ~block.any(axis=1)
            np.matmul(block - self.mean_, projection_t, out=out[start:start + step])
        l2_normalize(out)
        if self.power is not None:
            power_normalize(out, self.power)
            l2_normalize(out)
        out[zero] = 0
        return out

    @property
    def _n_features_out(self):
        return self.n_components_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # The output is float32 whatever the input (the index's precision): float32 is
        # preserved, float64 is not.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
