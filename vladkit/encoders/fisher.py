"""Fisher vectors (Perronnin & Dance 2007; Perronnin, Sanchez & Mensink 2010), as VLFeat."""

from __future__ import annotations

import math

import numpy as np

from ..kernels.encoding import fisher_statistics
from ..kernels.products import block_rows
from ..kernels.gaussian import diagonal_gaussian_terms
from .normalize import l2_normalize, power_normalize
from ..vocabulary.gmm import GMMVocabulary
from ._base import BaseEncoder, add_tasks, check_params, split_tasks

#: pca="auto": descriptors of more dimensions than this are reduced to it (defined in
#: ``_defaults``, which the command line's parser reads).
from .._util.defaults import AUTO_PCA  # noqa: E402

#: VLFeat drops posteriors below this, and skips components whose prior is below it.
POSTERIOR_THRESHOLD = 1e-6

#: Words whose log-density is more than log(K) + MARGIN below a descriptor's best are left
#: out of its softmax (no exp): their posteriors, below exp(-MARGIN) / K, are dropped by
#: the threshold anyway, and leaving them out of the denominator changes the others by
#: less than exp(-MARGIN) relative (4e-8 in float32: below its resolution; 4e-18 in float64).
MARGIN = {np.float32: 17.0, np.float64: 40.0}


class FisherEncoder(BaseEncoder):
    """Fisher vector: gradients of the GMM log-likelihood w.r.t. its means and variances.

    For a diagonal GMM with priors pi_k, means mu_k and variances sigma_k^2, the N
    descriptors x_i of an image, and posteriors q_ik (VLFeat's ``vl_fisher_encode``, whose
    results this matches element for element):

        u_k = 1 / (N sqrt(pi_k))   sum_i q_ik (x_i - mu_k) / sigma_k
        v_k = 1 / (N sqrt(2 pi_k)) sum_i q_ik [((x_i - mu_k) / sigma_k)^2 - 1]

    Posteriors below 1e-6 are dropped and components with pi_k < 1e-6 give zero blocks
    (as VLFeat). Output [u_1 .. u_K, v_1 .. v_K], 2 K D values, then (optionally) K
    weight gradients w_k = 1 / (N sqrt(pi_k)) sum_i (q_ik - pi_k) (Sanchez et al. 2013).
    Then ``power`` (``sign(z) |z|^power``) and ``l2`` (``z / max(||z||, 1e-12)``).

    Parameters
    ----------
    n_components : int, default=64
        Size K of the GMM trained by ``fit`` when ``vocabulary`` is None.
    vocabulary : None, str, path or GMMVocabulary
        As for :class:`VLADEncoder`. Its PCA, if any, is applied to descriptors first.
    improved : bool, default=True
        The "improved Fisher vector": forces power=0.5 and l2=True (VLFeat's IMPROVED).
    power : float or None, default=0.5
        Used when ``improved`` is False.
    l2 : bool, default=True
        Used when ``improved`` is False.
    fast : bool, default=False
        Keep only each descriptor's most probable component, with posterior 1 (VLFeat's FAST).
    include_weights : bool, default=False
        Append the K gradients w.r.t. the mixture weights (not in VLFeat).
    pca : int, "auto" or None, default="auto"
        PCA dimension for the vocabulary ``fit`` trains. "auto" is 64 for descriptors of
        more than 64 dimensions (SIFT: 128) and none otherwise: a diagonal GMM fits
        decorrelated descriptors much better (15-Scene, dense RootSIFT, K=64: 83.3%
        balanced accuracy with PCA-64, 79.2% without; Chatfield et al. 2011 use 80).
    passthrough_dims : int, default=0
        For the vocabulary ``fit`` trains: the last ``passthrough_dims`` descriptor
        dimensions stay out of its PCA and are modelled as they are, after the ``pca``
        components (2 for spatially augmented descriptors: the spatial Fisher vector of
        Sanchez, Perronnin & de Campos 2012, 2 K (pca + 2) values; see
        :mod:`vladkit.features.spatial_augmentation`). ``pca="auto"`` counts the other dimensions only.
    max_descriptors, random_state, n_jobs
        As for :class:`VLADEncoder`.

    Attributes
    ----------
    vocabulary_ : GMMVocabulary
    n_features_out_ : int
    """

    _vocabulary_class = GMMVocabulary
    _size_param = "n_components"
    # x^2 and ((x - mu) / sigma)^2 overflow float32 from |x| ~ 1e19: such input (rare, but
    # finite) is encoded in float64 instead.
    _float32_limit = 1e15

    def __init__(self, n_components=64, *, vocabulary=None, improved=True, power=0.5, l2=True,
                 fast=False, include_weights=False, pca="auto", passthrough_dims=0,
                 max_descriptors=200_000, random_state=None, n_jobs=None):
        self.n_components = n_components
        self.vocabulary = vocabulary
        self.improved = improved
        self.power = power
        self.l2 = l2
        self.fast = fast
        self.include_weights = include_weights
        self.pca = pca
        self.passthrough_dims = passthrough_dims
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_or_none=("power",))
        if self.pca is not None and self.pca != "auto" and not (
                isinstance(self.pca, (int, np.integer)) and not isinstance(self.pca, bool) and self.pca >= 1):
            raise ValueError(f"pca must be a positive integer, 'auto' or None, got {self.pca!r}")
        value = self.passthrough_dims
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"passthrough_dims must be an integer >= 0, got {value!r}")

    def _vocabulary_pca(self, X):
        if not (isinstance(self.pca, str) and self.pca == "auto"):
            return self.pca
        dims = {np.shape(getattr(item, "descriptors", item))[-1] - self.passthrough_dims for item in X}
        return AUTO_PCA if dims and max(dims) > AUTO_PCA else None

    def _start(self, n_images, dtype):
        vocabulary = self.vocabulary_
        weights = vocabulary.weights_.astype(np.float64)
        skip = weights < POSTERIOR_THRESHOLD
        means = vocabulary.means_.astype(np.float64)
        # Descriptors are centred on the mean of the means, y = x - c, in float64: the
        # log-densities are one float64 BLAS product of [y^2, y] with the GMM's
        # coefficients, and the sums of [y^2, y] hold the Fisher statistics (see _finish).
        centre = means.mean(axis=0)
        coefficients, constants = diagonal_gaussian_terms(means - centre, vocabulary.covariances_,
                                                          np.where(skip, 0.0, weights))
        if vocabulary.pca_components_ is None:
            pca_mean, pca_t = np.zeros(0, dtype), np.zeros((0, 0), dtype)
        else:
            pca_mean = vocabulary.pca_mean_.astype(dtype)
            pca_t = np.ascontiguousarray(vocabulary.pca_components_.T, dtype=dtype)
        shape = (n_images, vocabulary.n_words_, 2 * vocabulary.dim_)
        return {
            "kernel": (pca_mean, pca_t, centre, coefficients, constants, POSTERIOR_THRESHOLD,
                       math.log(vocabulary.n_words_) + MARGIN[np.dtype(dtype).type], bool(self.fast)),
            "skip": skip, "centre": centre,
            # sum_i q_ik [y_i^2, y_i] and sum_i q_ik per image, in float64: independent of
            # the order of addition (see VLADEncoder._start).
            "moments": np.zeros(shape, dtype=np.float64),
            "mass": np.zeros(shape[:2], dtype=np.float64),
        }

    def _project(self, chunk):
        # The projection is made block by block inside fisher_statistics.
        return chunk

    def _add(self, X, segments, acc):
        tasks = split_tasks(segments)
        moments = np.zeros((len(tasks),) + acc["moments"].shape[1:])
        mass = np.zeros((len(tasks), acc["mass"].shape[1]))
        dim = acc["moments"].shape[2] // 2
        fisher_statistics(X, *acc["kernel"], tasks, block_rows(max(acc["mass"].shape[1], 2 * dim)), moments, mass)
        add_tasks(acc["moments"], tasks, moments)
        add_tasks(acc["mass"], tasks, mass)

    def _finish(self, acc, counts):
        vocabulary = self.vocabulary_
        weights = vocabulary.weights_.astype(np.float64)
        n_images, dim = acc["moments"].shape[0], vocabulary.dim_
        # With a = mu_k - c, S1 = sum_i q_ik y_i, S2 = sum_i q_ik y_i^2 and m = sum_i q_ik:
        #   sum_i q_ik (x_i - mu_k) / sigma_k         = (S1 - m a) / sigma_k
        #   sum_i q_ik [((x_i - mu_k) / sigma_k)^2 - 1] = (S2 - 2 a S1 + m a^2) / sigma_k^2 - m
        # (float64: the cancellation costs ~ (|y| / sigma)^2 ulps, ~1e-14 here).
        second_moment, first_moment = acc["moments"][:, :, :dim], acc["moments"][:, :, dim:]
        mass = acc["mass"][:, :, None]
        offsets = vocabulary.means_.astype(np.float64) - acc["centre"]
        inverse_variances = 1.0 / vocabulary.covariances_.astype(np.float64)
        first = (first_moment - mass * offsets) * np.sqrt(inverse_variances)
        second = (second_moment - 2 * offsets * first_moment + mass * offsets**2) * inverse_variances - mass
        with np.errstate(divide="ignore"):
            per_image = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)[:, None]
            scale = np.where(acc["skip"], 0.0, 1.0 / np.sqrt(weights))[None, :] * per_image
        first *= scale[:, :, None]
        second *= (scale / np.sqrt(2.0))[:, :, None]
        parts = [first.reshape(n_images, -1), second.reshape(n_images, -1)]
        if self.include_weights:
            parts.append((acc["mass"] - counts[:, None] * weights[None, :]) * scale)
        vectors = np.concatenate(parts, axis=1)
        power = 0.5 if self.improved else self.power
        if power is not None:
            power_normalize(vectors, power)
        if self.improved or self.l2:
            l2_normalize(vectors)
        return vectors

    def _feature_names(self):
        vocabulary = self.vocabulary_
        names = [f"fisher_{part}_w{k}_d{d}" for part in ("mean", "var")
                 for k in range(vocabulary.n_words_) for d in range(vocabulary.dim_)]
        if self.include_weights:
            names += [f"fisher_weight_w{k}" for k in range(vocabulary.n_words_)]
        return names
