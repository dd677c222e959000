"""Vocabularies made from known arrays, without training (``KMeansVocabulary.from_centers``,
``GMMVocabulary.from_parameters``, :mod:`vladkit.encoders.functional`): the checks of the
given arrays, and the fitted vocabulary built from them.
"""

from __future__ import annotations

import numpy as np

#: ``GMMVocabulary.from_parameters`` accepts weights summing to 1 within this.
WEIGHTS_SUM_TOLERANCE = 1e-4


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
