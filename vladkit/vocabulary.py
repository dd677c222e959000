"""Visual vocabularies: k-means centers and diagonal Gaussian mixtures, and their files.

A vocabulary is trained on a bounded sample of descriptors spread over the images
(:class:`DescriptorSampler`), optionally after a PCA of the descriptors (Fisher vectors
want it: VLFeat's presets reduce SIFT to 80 dimensions). Training is scikit-learn's
(``KMeans``, ``MiniBatchKMeans``, ``GaussianMixture`` with diagonal covariances);
assignment uses vladkit's BLAS kernels, shared with the encoders.

Files are ``.npz`` archives holding plain arrays and one JSON metadata entry, read with
``allow_pickle=False`` (loading a file from a stranger cannot run code), written
atomically (a temporary file renamed into place) and byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from copy import deepcopy

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from ._version import __version__
from ._io import write_npz_atomically
from ._threads import limit_threads
from .kernels import diagonal_gaussian_terms, log_posteriors, nearest_words, squared_distances

__all__ = [
    "DescriptorSampler",
    "GMMVocabulary",
    "KMeansVocabulary",
    "VocabularyFileError",
    "load_vocabulary",
]

FILE_FORMAT = "vladkit-vocabulary"
FILE_FORMAT_VERSION = 1
#: algorithm="auto" switches from Lloyd's KMeans to MiniBatchKMeans above this many samples.
MINIBATCH_THRESHOLD = 500_000
#: ``GMMVocabulary.from_parameters`` accepts weights summing to 1 within this.
WEIGHTS_SUM_TOLERANCE = 1e-4


class VocabularyFileError(ValueError):
    """A vocabulary file is not one vladkit can load (the message says why)."""


# ------------------------------------------------------------------------- sampling


def _descriptors_of(item, index):
    """The (n, D) descriptor array of one image: a LocalFeatures or an array."""
    descriptors = getattr(item, "descriptors", item)
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise ValueError(
            f"image {index}: descriptors must be a 2-D (n, D) array, got shape {descriptors.shape}"
        )
    if descriptors.dtype.kind not in "fiu":
        raise TypeError(f"image {index}: descriptors must be numeric, got dtype {descriptors.dtype}")
    return descriptors


class DescriptorSampler:
    """Draw a bounded, reproducible sample of descriptors, image by image.

    Each image contributes at most ``ceil(max_descriptors / n_images)`` descriptors (and at
    most ``max_per_image``), drawn without replacement by a generator seeded from
    ``(seed, image index)``, so the sample does not depend on the order or batching in
    which images arrive. Only the sample is kept: a dataset's descriptors never need to be
    in memory at once.

    Parameters
    ----------
    n_images : int
    max_descriptors : int
    max_per_image : int or None
    seed : int
    """

    def __init__(self, n_images, max_descriptors, max_per_image=None, seed=0):
        if n_images < 1:
            raise ValueError("no images to sample descriptors from")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.quota = math.ceil(max_descriptors / n_images)
        if max_per_image is not None:
            self.quota = min(self.quota, int(max_per_image))
        self.max_descriptors = int(max_descriptors)
        self.seed = int(seed)
        self._parts = {}
        self._dim = None

    def add(self, index, descriptors):
        """Take this image's share of ``descriptors`` ((n, D)); checks finiteness and D."""
        descriptors = _descriptors_of(descriptors, index)
        if not np.all(np.isfinite(descriptors)):
            raise ValueError(f"image {index}: descriptors contain NaN or inf")
        self.keep(index, descriptors[self.select(index, len(descriptors))])

    def keep(self, index, descriptors):
        """Keep image ``index``'s rows already drawn with :meth:`select` (or, piece by
        piece, :meth:`select_share`); checks finiteness and D."""
        descriptors = _descriptors_of(descriptors, index)
        if len(descriptors) and self._dim is None:
            self._dim = descriptors.shape[1]
        if len(descriptors) and descriptors.shape[1] != self._dim:
            raise ValueError(
                f"image {index}: descriptors have dimension {descriptors.shape[1]}, "
                f"earlier images {self._dim}"
            )
        if not np.all(np.isfinite(descriptors)):
            raise ValueError(f"image {index}: descriptors contain NaN or inf")
        self._parts[index] = descriptors

    def select(self, index, n_rows):
        """Sorted indices of the rows of image ``index`` (which has ``n_rows`` descriptors)
        that belong to the sample; the same for the same seed, whatever the order."""
        if n_rows <= self.quota:
            return np.arange(n_rows)
        rng = np.random.default_rng([self.seed, 0, index])
        return np.sort(rng.choice(n_rows, self.quota, replace=False))

    def select_share(self, index, piece, n_rows, fraction):
        """Rows of piece number ``piece`` of image ``index`` (``n_rows`` descriptors, about
        ``fraction`` of the image's): its share ``ceil(fraction * quota)`` of the quota.
        For images extracted in pieces whose total is not known in advance."""
        quota = math.ceil(min(fraction, 1.0) * self.quota)
        if n_rows <= quota:
            return np.arange(n_rows)
        rng = np.random.default_rng([self.seed, 2, index, piece])
        return np.sort(rng.choice(n_rows, quota, replace=False))

    def sample(self):
        """The pooled sample, (n, D), in image order; at most ``max_descriptors`` rows."""
        parts = [self._parts[i] for i in sorted(self._parts) if len(self._parts[i])]
        if not parts:
            raise ValueError(f"no descriptors in any of the {len(self._parts)} images")
        pooled = np.concatenate(parts)
        if len(pooled) > self.max_descriptors:
            rng = np.random.default_rng([self.seed, 1])
            pooled = pooled[np.sort(rng.choice(len(pooled), self.max_descriptors, replace=False))]
        return pooled


def _sets_or_pooled(X):
    """``(sets, None)`` for per-image descriptor sets (a list of LocalFeatures or of
    (n_i, D) arrays), ``(None, X)`` for one pooled (N, D) array-like (an array, a
    DataFrame, a sparse matrix, a list of rows), which scikit-learn's validation checks."""
    if hasattr(X, "shape") or hasattr(X, "__array__") or isinstance(X, (str, bytes)):
        return None, X
    items = list(X)
    if items and np.ndim(getattr(items[0], "descriptors", items[0])) <= 1:
        return None, items  # rows of numbers (or numbers): one array-like, not sets
    return items, None


def _as_float(X):
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    return np.ascontiguousarray(X)


# ------------------------------------------------------------------------ the models


class _Vocabulary(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Shared: sampling, PCA, validation, files. Subclasses train the words.

    Given one pooled (N, D) array, a vocabulary is a scikit-learn transformer like
    ``KMeans`` / ``GaussianMixture`` (validation, ``n_features_in_``, messages and tags
    as scikit-learn's own checks expect); ``fit`` also takes a list of per-image
    descriptor sets, which the other methods do not.
    """

    _kind = None
    _size_param = None
    _word_arrays = ()

    #: Parameters that do not shape the trained words: ``n_jobs`` only bounds the training
    #: threads and ``descriptor_type`` is free text saved in the file. They may be set on a
    #: fitted vocabulary; every other parameter is a training parameter.
    _untrained_params = ("n_jobs", "descriptor_type")

    def __sklearn_clone__(self):
        """A fitted vocabulary is a trained artifact, like its file: ``sklearn.clone``
        (pipelines, grid searches, SpatialPyramid, ImageEncoder) gives a new vocabulary
        with equal parameters and a copy of the fitted state, so an encoder given one
        keeps using the same words. The copy shares nothing mutable with the original:
        setting a parameter of the clone never changes the original. An unfitted
        vocabulary clones as usual (unfitted)."""
        copy = super().__sklearn_clone__()
        if self._is_trained():
            # Fitted attributes end with "_" (scikit-learn's convention, check_is_fitted's
            # test). Deep copies rather than shared read-only views: the user may still
            # write into their arrays, and a vocabulary (KB to MB) costs little to copy
            # next to anything an encoder does with it.
            for name, value in vars(self).items():
                if name.endswith("_") and not name.startswith("__"):
                    setattr(copy, name, deepcopy(value))
        return copy

    def _is_trained(self):
        return hasattr(self, "descriptor_dim_")

    def set_params(self, **params):
        """Set parameters; on a fitted vocabulary, only those that do not shape the words.

        A fitted vocabulary's words were trained with its current parameters, and an
        encoder uses a fitted vocabulary as is (it does not retrain it). Changing a
        training parameter (``n_clusters``, ``pca``, ``random_state``, ...) of a fitted
        vocabulary would therefore change nothing but its description (and the metadata
        ``save`` writes), so it is refused with a ``ValueError``; setting a parameter to
        its current value, or ``n_jobs`` / ``descriptor_type``, is allowed. To train other
        words, pass an unfitted vocabulary to the encoder, or set the parameter through
        the encoder (``encoder.set_params(vocabulary__n_clusters=32)``, as a grid search
        does), which replaces its vocabulary with an unfitted copy trained by ``fit``.

        Parameters
        ----------
        **params : dict
            Parameter names and values.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            A training parameter of a fitted vocabulary is changed (the message names it).
        """
        # Refusing rather than dropping the words: this object may be the user's, shared
        # with other encoders or about to be saved; silently turning it back into an
        # untrained template (or keeping words that contradict n_clusters) would surprise
        # either way. Through an encoder (_with_params) a copy is retrained instead.
        if self._is_trained():
            current = self.get_params(deep=False)
            for name, value in params.items():
                if (name in current and name not in self._untrained_params
                        and not _same_value(current[name], value)):
                    raise ValueError(
                        f"cannot set {name}={value!r} on this fitted {type(self).__name__}: its "
                        f"{self.n_words_} words were trained with {name}={current[name]!r}, and a "
                        "fitted vocabulary is used as is, not retrained. To train one with "
                        f"{name}={value!r}, pass an unfitted {type(self).__name__}(...) to the "
                        f"encoder, or set it through the encoder (vocabulary__{name}=...), "
                        "which trains an unfitted copy in fit"
                    )
        return super().set_params(**params)

    def _with_params(self, **params):
        """A new vocabulary with ``params`` set; ``self`` is left as it is.

        For an encoder's ``set_params(vocabulary__name=value)``: naming any training
        parameter (even with its current value) gives an unfitted copy, which the
        encoder's ``fit`` trains; only ``n_jobs`` / ``descriptor_type`` keep the words (a
        fitted copy).
        """
        # Any training parameter named, even unchanged, means "train with these": so every
        # candidate of GridSearchCV(..., {"...__vocabulary__n_clusters": [8, 32]}) is trained
        # alike on its own training folds. Keeping the given words for the one value they
        # happen to match would compare words trained on other data (perhaps the
        # validation folds) with words trained per fold.
        retrain = any(name not in self._untrained_params for name in params)
        if retrain and self._is_trained():
            copy = BaseEstimator.__sklearn_clone__(self)  # unfitted, equal parameters
        else:
            copy = self.__sklearn_clone__()
        return copy.set_params(**params)

    # -- fitting --------------------------------------------------------------------

    def _seeds(self):
        rng = check_random_state(self.random_state)
        return int(rng.randint(2**31 - 1)), int(rng.randint(2**31 - 1))

    def fit(self, X, y=None):
        """Train the vocabulary on a sample of descriptors.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays, or one (N, D) array-like
            Descriptors per image (sampled at most ``max_descriptors`` in all, spread over
            the images), or one pooled array (sampled uniformly; a DataFrame's column
            names are kept in ``feature_names_in_``).
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        sample_seed, _ = self._seeds()
        sets, pooled = _sets_or_pooled(X)
        if sets is None:
            # scikit-learn's validation: its messages for sparse, complex, 1-D, empty or
            # non-finite input; sets n_features_in_ (and feature_names_in_ for a DataFrame).
            sets = [validate_data(self, pooled)]
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_  # per-image sets have no column names
        # A pooled array is one "image" with no per-image cap.
        sampler = DescriptorSampler(len(sets), self.max_descriptors,
                                    None if pooled is not None else self.max_per_image, sample_seed)
        for index, item in enumerate(sets):
            sampler.add(index, item)
        return self.fit_sample(sampler.sample())

    def fit_sample(self, sample):
        """Train on an already drawn (N, D) sample (all of it): PCA, then the words."""
        self._validate_params()
        sample = _as_float(sample)
        if sample.ndim != 2 or sample.shape[1] < 1:
            raise ValueError(f"the descriptor sample must be 2-D (N, D), got shape {sample.shape}")
        if not np.all(np.isfinite(sample)):
            raise ValueError("descriptors contain NaN or inf")
        n_words = getattr(self, self._size_param)
        if len(sample) < n_words:
            raise ValueError(
                f"only {len(sample)} descriptors to train {self._size_param}={n_words} words "
                f"(n_samples={len(sample)}); use fewer words or more images"
            )
        _, model_seed = self._seeds()
        self.descriptor_dim_ = sample.shape[1]
        self.n_features_in_ = sample.shape[1]
        self._fit_pca(sample, model_seed)
        projected = self._project(sample)
        with limit_threads(self.n_jobs):  # safe beside encoders running in other threads
            self._fit_words(projected, model_seed)
        self.n_training_descriptors_ = len(sample)
        return self

    def _fit_pca(self, sample, seed):
        if self.pca is None:
            self.pca_mean_ = self.pca_components_ = None
            return
        kept = int(self.passthrough_dims)
        dim = sample.shape[1] - kept
        if dim < 1:
            raise ValueError(f"passthrough_dims={kept} leaves no dimension of the {sample.shape[1]}-dimensional "
                             "descriptors to the PCA")
        if self.pca > dim:
            raise ValueError(f"pca={self.pca} exceeds the descriptor dimension {dim}"
                             + (f" ({sample.shape[1]} minus passthrough_dims={kept})" if kept else ""))
        sample = sample[:, :dim]  # the appearance part; the last `kept` columns pass through
        mean = sample.mean(axis=0, dtype=np.float64)
        centred = (sample - mean).astype(np.float64)
        # Eigen-decomposition of the D x D covariance: exact, and cheap for D ~ 128.
        covariance = centred.T @ centred / max(len(sample) - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1][: self.pca]
        components = eigenvectors[:, order].T
        # Deterministic signs (largest-magnitude entry of each component positive).
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components *= signs[:, None]
        if self.whiten:
            scale = np.sqrt(np.maximum(eigenvalues[order], 0)) + 1e-12 * max(eigenvalues.max(), 1e-30)
            components /= scale[:, None]
        if kept:
            # The passed-through columns as identity rows, with a zero mean: one affine map,
            # so project(), the files and from_parameters are those of any PCA, and the
            # columns come out exactly as they went in (x * 1 plus exact zeros).
            block = np.zeros((len(components) + kept, dim + kept))
            block[:len(components), :dim] = components
            block[len(components):, dim:] = np.eye(kept)
            components, mean = block, np.concatenate([mean, np.zeros(kept)])
        self.pca_mean_ = mean.astype(sample.dtype)
        self.pca_components_ = components.astype(sample.dtype)

    def project(self, descriptors):
        """Descriptors in the vocabulary's space: ``(x - mean) @ components.T`` with PCA
        (rows of ``components`` divided by the component's standard deviation when
        ``whiten``), unchanged without. With ``passthrough_dims`` = p, that is
        ``[PCA(x[:, :D - p]), x[:, D - p:]]``: the last p columns are copied exactly.

        Parameters
        ----------
        descriptors : (n, D) array

        Returns
        -------
        (n, pca + passthrough_dims or D) array, float32 or float64 as the input (float32
        for integers)
        """
        return self._project(self._check_descriptors(descriptors))

    def _project(self, X):
        """:meth:`project` without validation, for callers that validated X already."""
        if self.pca_components_ is None:
            return X
        components = self.pca_components_.astype(X.dtype, copy=False)
        return (X - self.pca_mean_.astype(X.dtype, copy=False)) @ components.T

    def _check_descriptors(self, descriptors):
        check_is_fitted(self, "descriptor_dim_")
        # scikit-learn's validation and messages (sparse, complex, 1-D or non-finite input,
        # a number of features other than n_features_in_). float32 and float64 are kept,
        # other numbers become float32; no rows is allowed (an image without descriptors).
        X = validate_data(self, descriptors, reset=False, dtype=(np.float32, np.float64),
                          order="C", ensure_min_samples=0)
        if X.shape[1] != self.descriptor_dim_:
            # The same message for a vocabulary not made by fit (without n_features_in_).
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                             f"expecting {self.descriptor_dim_} features as input")
        return X

    @property
    def n_words_(self):
        """Number of visual words (clusters or mixture components)."""
        return getattr(self, self._word_arrays[0]).shape[0]

    @property
    def _n_features_out(self):
        # transform gives one column per word (distances or posteriors).
        return self.n_words_

    @property
    def dim_(self):
        """Dimension of the words (after PCA)."""
        return getattr(self, self._word_arrays[0]).shape[1]

    # -- files ----------------------------------------------------------------------

    def save(self, path):
        """Write the vocabulary to ``path`` (.npz), atomically and reproducibly.

        The archive holds the fitted arrays and a ``metadata`` JSON entry (kind, sizes,
        dimensions, parameters, vladkit and format versions). Equal vocabularies give
        byte-identical files.
        """
        check_is_fitted(self, "descriptor_dim_")
        arrays = {name: getattr(self, name) for name in self._word_arrays}
        if self.pca_components_ is not None:
            arrays["pca_mean_"] = self.pca_mean_
            arrays["pca_components_"] = self.pca_components_
        metadata = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "kind": self._kind,
            "n_words": int(self.n_words_),
            "descriptor_dim": int(self.descriptor_dim_),
            "dim": int(self.dim_),
            "dtype": str(arrays[self._word_arrays[0]].dtype),
            "n_training_descriptors": int(self.n_training_descriptors_),
            "params": _jsonable(self.get_params()),
            "vladkit_version": __version__,
        }
        metadata.update(self._extra_metadata())
        arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
        write_npz_atomically(path, arrays)

    def _extra_metadata(self):
        return {}


class KMeansVocabulary(_Vocabulary):
    """k-means visual words (for BoF and VLAD).

    Trained with scikit-learn on at most ``max_descriptors`` descriptors: ``KMeans``
    (Lloyd, k-means++ initialisation) or, for large samples, ``MiniBatchKMeans``.

    Parameters
    ----------
    n_clusters : int, default=64
        Number of visual words K.
    max_descriptors : int, default=200_000
        Training sample size, spread evenly over the images.
    max_per_image : int or None, default=None
        Cap per image (on top of the even spread).
    pca : int or None, default=None
        Reduce descriptors to this many principal components first.
    whiten : bool, default=False
        Divide each principal component by its standard deviation.
    passthrough_dims : int, default=0
        With ``pca``: the last ``passthrough_dims`` descriptor dimensions are left out of
        the PCA (and of whitening) and appended, unchanged, after the ``pca`` components:
        the words have ``pca + passthrough_dims`` dimensions. For spatially augmented
        descriptors (2: the positions, see :mod:`vladkit.spatial_augmentation`), whose
        appearance alone is reduced (Sanchez, Perronnin & de Campos 2012). Without
        ``pca`` it changes nothing.
    algorithm : {"auto", "lloyd", "elkan", "minibatch"}, default="auto"
        "auto" is Lloyd up to 500,000 samples and mini-batch above.
    n_init : int, default=1
        Restarts (the best inertia is kept).
    max_iter : int, default=100
        Lloyd iterations (VLFeat's default); for mini-batch, passes over the sample.
    tol : float, default=1e-4
        scikit-learn's convergence tolerance on center movement.
    random_state : int, RandomState or None
        Seeds the sampling and the clustering; an int gives byte-identical vocabularies.
    n_jobs : int or None
        Threads for the clustering (None: all cores).
    descriptor_type : str or None
        Free text saved in the file, e.g. ``"DenseSIFT(root=True)"``.

    Attributes
    ----------
    centers_ : (n_clusters, dim) ndarray
        The words, in the PCA space if ``pca``.
    inertia_ : float
        Sum of squared distances of the training sample to its nearest center.
    n_iter_ : int
    pca_mean_, pca_components_ : ndarrays or None
        The PCA, ``(D,)`` and ``(pca + passthrough_dims, D)``: passed-through dimensions
        have a zero mean and an identity row.
    descriptor_dim_ : int
        Dimension of the descriptors the vocabulary accepts.
    """

    _kind = "kmeans"
    _size_param = "n_clusters"
    _word_arrays = ("centers_",)

    def __init__(self, n_clusters=64, *, max_descriptors=200_000, max_per_image=None, pca=None,
                 whiten=False, passthrough_dims=0, algorithm="auto", n_init=1, max_iter=100, tol=1e-4,
                 random_state=None, n_jobs=None, descriptor_type=None):
        self.n_clusters = n_clusters
        self.max_descriptors = max_descriptors
        self.max_per_image = max_per_image
        self.pca = pca
        self.whiten = whiten
        self.passthrough_dims = passthrough_dims
        self.algorithm = algorithm
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.descriptor_type = descriptor_type

    @classmethod
    def from_centers(cls, centers, *, pca_mean=None, pca_components=None, descriptor_type=None):
        """A fitted vocabulary made from known centers (no training).

        The arrays are checked as :func:`load_vocabulary` checks a file, and copied.

        Parameters
        ----------
        centers : (K, D) array of real numbers
            The words, finite; in the PCA space if a PCA is given.
        pca_mean : (D_in,) array or None
            Mean subtracted from the descriptors before the projection.
        pca_components : (D, D_in) array or None
            Projection applied to the centred descriptors (``project`` computes
            ``(x - pca_mean) @ pca_components.T``); give both PCA arrays or neither.
        descriptor_type : str or None
            Free text saved in the file.

        Returns
        -------
        KMeansVocabulary
            Fitted: ``predict``, ``save`` and the encoders use it as is. Its arrays are
            float32 if every given array is float32, float64 otherwise.

        Raises
        ------
        ValueError
            An array has the wrong shape (the message names it), contains NaN or inf, or
            only one PCA array is given.
        TypeError
            An array is not made of real numbers.
        """
        (centers,), pca = _checked_arrays([("centers", centers, 2)], pca_mean, pca_components)
        return _fitted_vocabulary(cls, {"centers_": centers}, pca, descriptor_type)

    def _validate_params(self):
        _check_positive_int(self, "n_clusters", "max_descriptors", "n_init", "max_iter")
        _check_common(self)
        if self.algorithm not in ("auto", "lloyd", "elkan", "minibatch"):
            raise ValueError(f"algorithm must be 'auto', 'lloyd', 'elkan' or 'minibatch', got {self.algorithm!r}")

    def _fit_words(self, X, seed):
        algorithm = self.algorithm
        if algorithm == "auto":
            algorithm = "minibatch" if len(X) > MINIBATCH_THRESHOLD else "lloyd"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if algorithm == "minibatch":
                model = MiniBatchKMeans(
                    self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                    batch_size=4096, random_state=seed, compute_labels=False,
                )
            else:
                model = KMeans(self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                               tol=self.tol, random_state=seed, algorithm=algorithm)
            model.fit(X)
        centers = model.cluster_centers_.astype(X.dtype)
        n_distinct = len(np.unique(centers, axis=0))
        if n_distinct < self.n_clusters or any(
            "distinct clusters" in str(w.message) for w in caught
        ):
            raise ValueError(
                f"the descriptors have fewer distinct values than n_clusters={self.n_clusters} "
                "(e.g. all identical); use fewer clusters or more varied images"
            )
        self.centers_ = np.ascontiguousarray(centers)
        self.n_iter_ = int(model.n_iter_)
        self.inertia_ = float(nearest_words(X.astype(np.float64), self.centers_.astype(np.float64))[1].sum())

    def predict(self, descriptors):
        """Index of the nearest center for each descriptor ((n, D) array) -> (n,) int64."""
        X = self.project(descriptors)
        return nearest_words(X, self.centers_.astype(X.dtype, copy=False))[0]

    def transform(self, descriptors):
        """(n, n_clusters) Euclidean distances to the centers (scikit-learn's KMeans.transform)."""
        X = self.project(descriptors)
        return np.sqrt(squared_distances(X, self.centers_.astype(X.dtype, copy=False)))

    def score(self, descriptors, y=None):
        """Negative sum of squared distances to the nearest center (higher is better)."""
        X = self.project(descriptors)
        return -float(nearest_words(X, self.centers_.astype(X.dtype, copy=False))[1].sum(dtype=np.float64))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Distances come in the input's precision, as KMeans.transform's.
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


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


# -------------------------------------------------------------------------- helpers


def _check_positive_int(estimator, *names):
    for name in names:
        value = getattr(estimator, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_common(estimator):
    if estimator.max_per_image is not None:
        _check_positive_int(estimator, "max_per_image")
    if estimator.pca is not None:
        _check_positive_int(estimator, "pca")
    _check_non_negative_int(estimator, "passthrough_dims")


def _check_non_negative_int(estimator, name):
    value = getattr(estimator, name)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _checked_arrays(named, pca_mean, pca_components):
    """Validated copies of the arrays of a vocabulary made from known parameters.

    ``named`` lists (argument name, value, ndim); the first is the (K, D) words array,
    the others must have its K rows (and its D columns if 2-D). Checks, naming the
    argument: real numbers, shape, at least one word and one dimension, finite values;
    the PCA arrays as ``load_vocabulary`` checks a file's. All arrays are returned
    C-contiguous in one dtype: float32 if every one is float32, float64 otherwise.

    Returns ``([arrays in the order of named], (pca_mean, pca_components) or None)``.
    """
    if (pca_mean is None) != (pca_components is None):
        raise ValueError("pca_mean and pca_components go together: give both or neither")
    if pca_mean is not None:
        named = named + [("pca_components", pca_components, 2), ("pca_mean", pca_mean, 1)]
    arrays = []
    for name, value, ndim in named:
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be an array of real numbers, got dtype {array.dtype}")
        if array.ndim != ndim:
            raise ValueError(f"{name} must be a {ndim}-D array, got shape {array.shape}")
        arrays.append(array)
    first_name, words = named[0][0], arrays[0]
    n_words, dim = words.shape
    if n_words < 1 or dim < 1:
        raise ValueError(f"{first_name} must have at least one row and one column, got shape {words.shape}")
    for (name, _, ndim), array in zip(named[1:], arrays[1:]):
        if name.startswith("pca_"):
            continue
        expected = (n_words, dim)[:ndim]
        if array.shape != expected:
            raise ValueError(
                f"{name} has shape {array.shape}, expected {expected} (one "
                f"{'row' if ndim == 2 else 'value'} per word of {first_name}, shape {words.shape})"
            )
    if pca_mean is not None:
        components, mean = arrays[-2], arrays[-1]
        if components.shape[0] != dim or components.shape[1] < dim:
            raise ValueError(
                f"pca_components has shape {components.shape}, expected ({dim}, D_in) with "
                f"D_in >= {dim}: one row per dimension of {first_name} (shape {words.shape}), "
                "one column per descriptor dimension"
            )
        if mean.shape != (components.shape[1],):
            raise ValueError(
                f"pca_mean has shape {mean.shape}, expected ({components.shape[1]},): one value "
                f"per descriptor dimension (pca_components has shape {components.shape})"
            )
    dtype = np.float32 if all(a.dtype == np.float32 for a in arrays) else np.float64
    arrays = [np.array(a, dtype=dtype, order="C", copy=True) for a in arrays]
    for (name, _, _), array in zip(named, arrays):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf")
    if pca_mean is None:
        return arrays, None
    return arrays[:-2], (arrays[-1], arrays[-2])


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


def _checked_gmm_arrays(means, covariances, weights, pca_mean=None, pca_components=None, *,
                        weights_name="weights", weights_sum_tolerance=None):
    """``_checked_arrays`` for a diagonal GMM, plus: variances > 0, weights >= 0 summing
    to 1 within ``weights_sum_tolerance`` (WEIGHTS_SUM_TOLERANCE if None; ``math.inf``
    skips the sum check). Returns ``({"means_": ..., ...}, pca)``."""
    (means, covariances, weights), pca = _checked_arrays(
        [("means", means, 2), ("covariances", covariances, 2), (weights_name, weights, 1)],
        pca_mean, pca_components)
    if np.any(covariances <= 0):
        raise ValueError(
            f"covariances must be positive (the diagonal variances): {np.count_nonzero(covariances <= 0)} "
            f"of them are <= 0 (smallest {covariances.min():.6g})"
        )
    if np.any(weights < 0):
        raise ValueError(f"{weights_name} must be >= 0, got {weights.min():.6g} (component {int(weights.argmin())})")
    tolerance = WEIGHTS_SUM_TOLERANCE if weights_sum_tolerance is None else weights_sum_tolerance
    total = float(weights.sum(dtype=np.float64))
    if not abs(total - 1.0) <= tolerance:
        raise ValueError(
            f"{weights_name} must sum to 1 (the mixture's priors), got a sum of {total:.8g} "
            f"(tolerance {tolerance:g}; they are used as given, not renormalised)"
        )
    return {"means_": means, "covariances_": covariances, "weights_": weights}, pca


def _fitted_vocabulary(cls, words, pca, descriptor_type):
    """A fitted ``cls`` with the given (already validated) word arrays and PCA: the state
    ``load_vocabulary`` gives, with parameters describing the words (size, ``pca``)."""
    first = words[cls._word_arrays[0]]
    vocab = cls(first.shape[0], pca=None if pca is None else first.shape[1],
                descriptor_type=descriptor_type)
    for name, array in words.items():
        setattr(vocab, name, array)
    if pca is None:
        vocab.pca_mean_ = vocab.pca_components_ = None
        vocab.descriptor_dim_ = int(first.shape[1])
    else:
        vocab.pca_mean_, vocab.pca_components_ = pca
        vocab.descriptor_dim_ = int(vocab.pca_mean_.shape[0])
    vocab.n_features_in_ = vocab.descriptor_dim_
    vocab.n_training_descriptors_ = 0
    return vocab


def _same_value(old, new):
    """Whether a parameter value is unchanged (``8 == np.int64(8)``; a RandomState only
    equals itself)."""
    if old is new:
        return True
    try:
        return bool(old == new)
    except (TypeError, ValueError):  # e.g. arrays, whose == is elementwise
        return False


def _jsonable(params):
    out = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:  # e.g. a RandomState: not reproducible from the file anyway
            out[key] = None
    return out


def load_vocabulary(path, *, descriptor_dim=None):
    """Load a vocabulary written by ``save``.

    Parameters
    ----------
    path : str or path-like
    descriptor_dim : int or None
        If given, refuse a vocabulary trained on descriptors of another dimension.

    Returns
    -------
    KMeansVocabulary or GMMVocabulary, fitted

    Raises
    ------
    VocabularyFileError
        Not an .npz archive, pickled objects inside, not a vladkit vocabulary, an unknown
        kind or format version, inconsistent shapes, or the wrong descriptor dimension.
    """
    name = os.fspath(path)
    try:
        archive = np.load(name, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise VocabularyFileError(f"{name!r} is not a vocabulary file (not a readable .npz archive: {exc})") from exc
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise VocabularyFileError(
                        f"{name!r} contains pickled Python objects (entry {key!r}); vladkit "
                        "vocabularies hold plain arrays only, so it refuses to load it "
                        "(unpickling could run arbitrary code)"
                    ) from exc
                raise VocabularyFileError(f"{name!r}: entry {key!r} cannot be read: {exc}") from exc
    if "metadata" not in arrays:
        raise VocabularyFileError(f"{name!r} is not a vladkit vocabulary (no metadata entry)")
    try:
        metadata = json.loads(str(arrays.pop("metadata")))
    except ValueError as exc:
        raise VocabularyFileError(f"{name!r}: the metadata entry is not valid JSON") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FILE_FORMAT:
        raise VocabularyFileError(f"{name!r} is not a vladkit vocabulary (format {metadata.get('format')!r})"
                                  if isinstance(metadata, dict) else f"{name!r}: bad metadata")
    version = metadata.get("format_version")
    if version != FILE_FORMAT_VERSION:
        raise VocabularyFileError(
            f"{name!r} has vocabulary format version {version!r}; this vladkit "
            f"({__version__}) reads version {FILE_FORMAT_VERSION} (re-create the vocabulary, "
            "or use the vladkit version that wrote it)"
        )
    classes = {"kmeans": KMeansVocabulary, "gmm": GMMVocabulary}
    kind = metadata.get("kind")
    if kind not in classes:
        raise VocabularyFileError(f"{name!r}: unknown vocabulary kind {kind!r}")
    cls = classes[kind]
    vocab = cls()
    params = {k: v for k, v in metadata.get("params", {}).items() if k in vocab.get_params()}
    vocab.set_params(**params)

    missing = [a for a in cls._word_arrays if a not in arrays]
    if missing:
        raise VocabularyFileError(f"{name!r}: missing arrays {missing}")
    n_words, dim = metadata["n_words"], metadata["dim"]
    expected_shapes = {"centers_": (n_words, dim), "means_": (n_words, dim),
                       "covariances_": (n_words, dim), "weights_": (n_words,)}
    for attribute in cls._word_arrays:
        array = arrays[attribute]
        if array.shape != expected_shapes[attribute] or array.dtype.kind != "f":
            raise VocabularyFileError(
                f"{name!r}: {attribute} has shape {array.shape} and dtype {array.dtype}, "
                f"expected {expected_shapes[attribute]} floats"
            )
        if not np.all(np.isfinite(array)):
            raise VocabularyFileError(f"{name!r}: {attribute} contains NaN or inf")
        setattr(vocab, attribute, array)
    if kind == "gmm" and (np.any(vocab.covariances_ <= 0) or np.any(vocab.weights_ < 0)):
        raise VocabularyFileError(f"{name!r}: variances must be positive and weights non-negative")

    stored_dim = metadata["descriptor_dim"]
    if "pca_components_" in arrays:
        components, mean = arrays["pca_components_"], arrays["pca_mean_"]
        if components.shape != (dim, stored_dim) or mean.shape != (stored_dim,):
            raise VocabularyFileError(
                f"{name!r}: PCA shapes {components.shape} / {mean.shape} do not match "
                f"{dim} components of {stored_dim}-dimensional descriptors"
            )
        vocab.pca_components_, vocab.pca_mean_ = components, mean
    else:
        if dim != stored_dim:
            raise VocabularyFileError(f"{name!r}: words of dimension {dim} without PCA for {stored_dim}-D descriptors")
        vocab.pca_components_ = vocab.pca_mean_ = None
    if descriptor_dim is not None and descriptor_dim != stored_dim:
        raise VocabularyFileError(
            f"{name!r} was trained on {stored_dim}-dimensional descriptors, but the descriptors "
            f"here have dimension {descriptor_dim}"
        )
    vocab.descriptor_dim_ = int(stored_dim)
    vocab.n_features_in_ = int(stored_dim)  # as after fit (scikit-learn's name for it)
    vocab.n_training_descriptors_ = int(metadata.get("n_training_descriptors", 0))
    vocab.metadata_ = metadata
    return vocab
