"""Reading a vocabulary file (:mod:`.fileformat`): :func:`load_vocabulary`, which checks
every entry and gives back a fitted :class:`KMeansVocabulary` or :class:`GMMVocabulary`."""

from __future__ import annotations

import json
import os

import numpy as np

from .._version import __version__
from .fileformat import FILE_FORMAT, FILE_FORMAT_VERSION, VocabularyFileError
from .gmm import GMMVocabulary
from .kmeans import KMeansVocabulary

__all__ = ["load_vocabulary"]


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
    if kind == "kmeans":
        # Which algorithm trained the words; None in files written before it was recorded.
        algorithm = metadata.get("algorithm")
        vocab.algorithm_ = algorithm if isinstance(algorithm, str) else None
    vocab.metadata_ = metadata
    return vocab
