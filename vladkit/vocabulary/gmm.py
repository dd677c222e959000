"""Diagonal Gaussian mixture visual words (for Fisher vectors): :class:`GMMVocabulary`,
trained with scikit-learn's ``GaussianMixture`` initialised from k-means."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from ..kernels.gaussian import diagonal_gaussian_terms, log_posteriors
from .arrays import _checked_gmm_arrays, _fitted_vocabulary
from .base import _check_common, _check_positive_int, _Vocabulary

__all__ = ["GMMVocabulary"]


class GMMVocabulary(_Vocabulary):
    """Diagonal Gaussian mixture visual words (for Fisher vectors).

    Trained with scikit-learn's ``GaussianMixture(covariance_type="diag")`` initialised
    from k-means, on at most ``max_descriptors`` descriptors.

    Parameters
    ----------
    n_components : int, default=64
        Number of Gaussians K.
    max_descriptors : int, default=200_000
    max_per_image : int or None, default=None
    pca : int or None, default=None
        Reduce descriptors to this many principal components first (VLFeat's Fisher
        preset: 80 for SIFT).
    whiten : bool, default=False
    passthrough_dims : int, default=0
        As for :class:`KMeansVocabulary`: 2 for spatially augmented descriptors, whose
        positions are then modelled as they are, after the PCA of the appearance (the
        spatial Fisher vector of Sanchez et al. 2012).
    covariance_floor : float, default=1e-4
        Variance regularisation relative to the data: ``covariance_floor`` times the
        largest per-dimension variance of the training sample is added to every variance
        at each EM step (scikit-learn's ``reg_covar``), so no variance falls below it and
        none can collapse to 0 (VLFeat bounds variances below in the same way).
    n_init : int, default=1
    max_iter : int, default=100
    tol : float, default=1e-3
        EM stops when the average log-likelihood gains less than this.
    random_state, n_jobs, descriptor_type
        As for :class:`KMeansVocabulary`.

    Attributes
    ----------
    means_ : (n_components, dim) ndarray
    covariances_ : (n_components, dim) ndarray, the diagonal variances
    weights_ : (n_components,) ndarray, the priors
    lower_bound_ : float, final average log-likelihood of the training sample
    n_iter_ : int
    pca_mean_, pca_components_, descriptor_dim_
        As for :class:`KMeansVocabulary`.
    """

    _kind = "gmm"
    _size_param = "n_components"
    _word_arrays = ("means_", "covariances_", "weights_")

    def __init__(self, n_components=64, *, max_descriptors=200_000, max_per_image=None, pca=None,
                 whiten=False, passthrough_dims=0, covariance_floor=1e-4, n_init=1, max_iter=100,
                 tol=1e-3, random_state=None, n_jobs=None, descriptor_type=None):
        self.n_components = n_components
        self.max_descriptors = max_descriptors
        self.max_per_image = max_per_image
        self.pca = pca
        self.whiten = whiten
        self.passthrough_dims = passthrough_dims
        self.covariance_floor = covariance_floor
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.descriptor_type = descriptor_type

    @classmethod
    def from_parameters(cls, means, covariances, weights, *, pca_mean=None, pca_components=None,
                        descriptor_type=None):
        """A fitted vocabulary made from known mixture parameters (no training).

        The arrays are checked as :func:`load_vocabulary` checks a file, and copied.

        Parameters
        ----------
        means : (K, D) array of real numbers
            Component means, in the PCA space if a PCA is given.
        covariances : (K, D) array
            The diagonal variances, all > 0.
        weights : (K,) array
            The priors: >= 0, summing to 1 (within ``WEIGHTS_SUM_TOLERANCE``, 1e-4; they are
            used as given, not renormalised). Components below 1e-6 are skipped by the
            Fisher encoder, as VLFeat does.
        pca_mean, pca_components, descriptor_type
            As for :meth:`KMeansVocabulary.from_centers`.

        Returns
        -------
        GMMVocabulary
            Fitted; float32 if every given array is float32, float64 otherwise.

        Raises
        ------
        ValueError
            A wrong shape, NaN or inf, a variance <= 0, a negative weight or weights not
            summing to 1 (the message names the argument), or only one PCA array given.
        TypeError
            An array is not made of real numbers.
        """
        words, pca = _checked_gmm_arrays(means, covariances, weights, pca_mean, pca_components)
        return _fitted_vocabulary(cls, words, pca, descriptor_type)

    def _validate_params(self):
        _check_positive_int(self, "n_components", "max_descriptors", "n_init", "max_iter")
        _check_common(self)
        if not (np.isfinite(self.covariance_floor) and self.covariance_floor > 0):
            raise ValueError(f"covariance_floor must be a positive number, got {self.covariance_floor!r}")

    def _fit_words(self, X, seed):
        if len(X) < 2:  # as GaussianMixture: no variance to estimate from one descriptor
            raise ValueError(f"a Gaussian mixture needs at least 2 descriptors, got n_samples={len(X)}")
        largest_variance = float(X.var(axis=0, dtype=np.float64).max())
        if largest_variance == 0:
            raise ValueError(
                "all descriptors are identical: a Gaussian mixture needs varied data"
            )
        floor = self.covariance_floor * largest_variance
        model = GaussianMixture(
            self.n_components, covariance_type="diag", tol=self.tol,
            reg_covar=floor, max_iter=self.max_iter,
            n_init=self.n_init, init_params="kmeans", random_state=seed,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            try:
                model.fit(X)
            except ValueError as exc:
                # EM in float32 can lose a variance to round-off (E[x^2] - E[x]^2 of a
                # component on near-identical rows falls below the floor; measured on
                # 15-Scene's spatially augmented RootSIFT, whose positions repeat from
                # image to image): scikit-learn's advice is float64 data. Kept for this
                # case only, so the vocabularies float32 EM trains stay as they were.
                if X.dtype != np.float32 or "ill-defined empirical covariance" not in str(exc):
                    raise
                model.fit(_float64_retry_rows(X, self.n_components, seed))
        self.means_ = np.ascontiguousarray(model.means_.astype(X.dtype))
        # reg_covar is added to variances computed as E[x^2] - E[x]^2, whose round-off can
        # be negative on a constant dimension: clamp so the floor holds exactly.
        self.covariances_ = np.ascontiguousarray(np.maximum(model.covariances_, floor).astype(X.dtype))
        self.weights_ = np.ascontiguousarray(model.weights_.astype(X.dtype))
        self.lower_bound_ = float(model.lower_bound_)
        self.n_iter_ = int(model.n_iter_)
        self.converged_ = bool(model.converged_)

    def _terms(self):
        return diagonal_gaussian_terms(self.means_, self.covariances_, self.weights_)

    def predict_proba(self, descriptors):
        """(n, n_components) posteriors q_ik (float64)."""
        X = self.project(descriptors).astype(np.float64)
        return np.exp(log_posteriors(X, *self._terms())[0])

    def predict(self, descriptors):
        """Most probable component of each descriptor -> (n,) int64."""
        X = self.project(descriptors).astype(np.float64)
        return np.argmax(log_posteriors(X, *self._terms())[0], axis=1)

    transform = predict_proba

    def score_samples(self, descriptors):
        """(n,) log-likelihood of each descriptor under the mixture."""
        X = self.project(descriptors).astype(np.float64)
        return log_posteriors(X, *self._terms())[1]

    def score(self, descriptors, y=None):
        """Average log-likelihood per descriptor (GaussianMixture.score's meaning)."""
        return float(self.score_samples(descriptors).mean())


def _float64_retry_rows(X, n_components, seed):
    """The rows a float64 EM retry runs on: at most half of ``X``, so it needs no more
    memory than the float32 fit did.

    EM's working set is a few (n, n_components) arrays; in float64 they are twice the
    float32 ones. Measured on 15-Scene's 300,000 spatially augmented RootSIFT at K=256
    (PCA-80 + 2): a resident 3.9 GB during the float64 retry on all rows, which took the
    benchmark's peak from 2.7 GB to 4.9 GB. Half the rows, drawn at random with the fit's
    seed, keep the peak where the float32 fit had it; K=256 still gets ~600 descriptors
    per component from 300,000.
    """
    n_rows = max(len(X) // 2, min(len(X), 2 * n_components))
    if n_rows < len(X):
        rows = np.sort(np.random.default_rng(seed).choice(len(X), n_rows, replace=False))
        X = X[rows]
    return X.astype(np.float64)
