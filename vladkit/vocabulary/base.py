"""The base of both vocabularies, :class:`_Vocabulary`: sampling, PCA, validation and
saving; its subclasses (:mod:`.kmeans`, :mod:`.gmm`) train the words.

A vocabulary is trained on a bounded sample of descriptors spread over the images
(:class:`DescriptorSampler`), optionally after a PCA of the descriptors (Fisher vectors
want it: VLFeat's presets reduce SIFT to 80 dimensions). Training is scikit-learn's
(``KMeans``, ``MiniBatchKMeans``, ``GaussianMixture`` with diagonal covariances), or
faiss's k-means for large codebooks; assignment uses vladkit's BLAS kernels, shared with
the encoders.
"""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from .._version import __version__
from .._util.io import write_npz_atomically
from .._util.threads import limit_threads
from .fileformat import FILE_FORMAT, FILE_FORMAT_VERSION, _jsonable
from .sampling import DescriptorSampler, _sets_or_pooled


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


def _same_value(old, new):
    """Whether a parameter value is unchanged (``8 == np.int64(8)``; a RandomState only
    equals itself)."""
    if old is new:
        return True
    try:
        return bool(old == new)
    except (TypeError, ValueError):  # e.g. arrays, whose == is elementwise
        return False
