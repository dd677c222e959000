"""Fisher vectors (Perronnin & Dance 2007; Perronnin, Sanchez & Mensink 2010), as VLFeat."""

from __future__ import annotations

import numpy as np

from ..kernels import accumulate_fisher, diagonal_gaussian_terms, gaussian_log_densities
from ..normalize import l2_normalize, power_normalize
from ..vocabulary import GMMVocabulary
from ._base import BaseEncoder, add_tasks, check_params, split_tasks

#: pca="auto": descriptors of more dimensions than this are reduced to it.
AUTO_PCA = 64

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
    Then ``power`` (sign(z) |z|^power) and ``l2`` (z / max(||z||, 1e-12)).

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
                 fast=False, include_weights=False, pca="auto", max_descriptors=200_000,
                 random_state=None, n_jobs=None):
        self.n_components = n_components
        self.vocabulary = vocabulary
        self.improved = improved
        self.power = power
        self.l2 = l2
        self.fast = fast
        self.include_weights = include_weights
        self.pca = pca
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_or_none=("power",))
        if self.pca is not None and self.pca != "auto" and not (
                isinstance(self.pca, (int, np.integer)) and not isinstance(self.pca, bool) and self.pca >= 1):
            raise ValueError(f"pca must be a positive integer, 'auto' or None, got {self.pca!r}")

    def _vocabulary_pca(self, X):
        if not (isinstance(self.pca, str) and self.pca == "auto"):
            return self.pca
        dims = {np.shape(getattr(item, "descriptors", item))[-1] for item in X}
        return AUTO_PCA if dims and max(dims) > AUTO_PCA else None

    def _start(self, n_images, dtype):
        vocabulary = self.vocabulary_
        weights = vocabulary.weights_.astype(np.float64)
        skip = weights < POSTERIOR_THRESHOLD
        means = vocabulary.means_.astype(np.float64)
        # Log-densities: one float64 BLAS product of [x^2, x] with the GMM's coefficients,
        # on data centred on the mean of the means. In float32 the expansion cancels badly
        # when variances are small next to the values (RootSIFT's are: errors 20-35x
        # VLFeat float's); in float64 it is exact to ~1e-10 nats.
        centre = means.mean(axis=0)
        coefficients, constants = diagonal_gaussian_terms(
            means - centre, vocabulary.covariances_, np.where(skip, 0.0, weights))
        shape = (n_images, vocabulary.n_words_, vocabulary.dim_)
        return {
            "centre": centre, "coefficients": coefficients, "constants": constants,
            "means": means.astype(dtype),
            "inv_sigmas": (1.0 / np.sqrt(vocabulary.covariances_.astype(np.float64))).astype(dtype),
            "skip": skip,
            # float64 sums: independent of the order of addition (see VLADEncoder._start).
            "first": np.zeros(shape, dtype=np.float64),
            "second": np.zeros(shape, dtype=np.float64),
            "mass": np.zeros(shape[:2], dtype=np.float64),
        }

    def _add(self, X, segments, acc):
        log_densities = gaussian_log_densities(X.astype(np.float64) - acc["centre"], acc["coefficients"],
                                               acc["constants"])
        # Posteriors are sparse (VLFeat's 1e-6 threshold leaves a few per descriptor):
        # aggregate over the non-zero ones only, directly on (x - mu) / sigma.
        tasks = split_tasks(segments)
        shape = (len(tasks),) + acc["first"].shape[1:]
        first = np.zeros(shape, dtype=np.float64)
        second = np.zeros(shape, dtype=np.float64)
        mass = np.zeros(shape[:2], dtype=np.float64)
        accumulate_fisher(X, log_densities, POSTERIOR_THRESHOLD, MARGIN[X.dtype.type], self.fast, acc["skip"],
                          acc["means"], acc["inv_sigmas"], tasks, first, second, mass)
        add_tasks(acc["first"], tasks, first)
        add_tasks(acc["second"], tasks, second)
        add_tasks(acc["mass"], tasks, mass)

    def _finish(self, acc, counts):
        weights = self.vocabulary_.weights_.astype(np.float64)
        first, second = acc["first"], acc["second"]
        n_images, n_words, dim = first.shape
        with np.errstate(divide="ignore"):
            per_image = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)[:, None]
            scale = np.where(acc["skip"], 0.0, 1.0 / np.sqrt(weights))[None, :] * per_image
        first *= scale[:, :, None].astype(first.dtype)
        second *= (scale / np.sqrt(2.0))[:, :, None].astype(second.dtype)
        parts = [first.reshape(n_images, -1), second.reshape(n_images, -1)]
        if self.include_weights:
            gradient = (acc["mass"] - counts[:, None] * weights[None, :]) * scale
            parts.append(gradient.astype(first.dtype))
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
