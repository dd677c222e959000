"""Selective match kernels' encoder: each image's descriptors as a set of (word,
signature) pairs, one per visual word it holds (Tolias, Avrithis & Jégou, ICCV 2013).

ASMK aggregates the residuals of an image's descriptors per visual word,

    V(X_c) = sum_{x in X_c} (x - q_c),

and keeps one signature per word: the unit vector V / (||V|| + 1e-6) (ASMK), or the signs
of V packed into bits (ASMK*: 128 bits, 16 bytes, for SIFT). Two images are compared
word by word over an inverted file (:class:`vladkit.retrieval.asmk_index.ASMKIndex`).
With multiple assignment a descriptor goes to each of its m nearest words (the
reference uses m = 1 for the database and m = 5 for queries).

Arithmetic as the reference package ``asmk`` (0.1.1): residuals summed in the
descriptors' dtype, row after row; a component is a 1 bit when strictly positive. The
MATLAB original subtracts a per-word median before the signs; that variant is not built
here (the package's plain signs are the default the comparisons are made with).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .._util.threads import numba_threads
from .._util.blas import load_faiss
from ..kernels.asmk import aggregate_images
from ..kernels.nearest import candidate_count, exact_nearest
from ..vocabulary.base import _Vocabulary
from ..vocabulary.kmeans import KMeansVocabulary
from ..vocabulary.loading import load_vocabulary
from ._base import CHUNK_ROWS, check_params, descriptor_sets

__all__ = ["ASMKEncoder", "WordSignatures"]


@dataclass(frozen=True, eq=False)
class WordSignatures:
    """One image for ASMK: the visual words it holds and a signature per word.

    Attributes
    ----------
    words : (n,) int64 ndarray
        The distinct words, increasing.
    signatures : (n, ceil(D / 8)) uint8 ndarray (binary: sign bits, most significant bit
        first) or (n, D) float32 ndarray (unit aggregated residuals)
    """

    words: np.ndarray
    signatures: np.ndarray

    def __len__(self):
        return len(self.words)

    @property
    def binary(self):
        return self.signatures.dtype == np.uint8


class ASMKEncoder(TransformerMixin, BaseEstimator):
    """Aggregated selective match kernel signatures (ASMK, ASMK*) of descriptor sets.

    Parameters
    ----------
    vocabulary : KMeansVocabulary, str or path, or None
        The words (a fitted :class:`~vladkit.KMeansVocabulary` or its file); None trains
        ``n_words`` of them on the descriptors given to :meth:`fit`. ASMK wants large
        vocabularies (4k-64k words).
    n_words : int, default=1024
        Only with ``vocabulary=None``.
    binary : bool, default=True
        ASMK* (packed sign bits) rather than ASMK (float unit vectors).
    multiple_assignment : int, default=1
        m for the indexed images (:meth:`transform`): each descriptor's residual goes to its
        m nearest words.
    query_assignment : int, default=5
        m for queries (:meth:`transform_queries`).
    max_descriptors : int, default=200_000
        Training sample of a vocabulary trained in :meth:`fit`.
    n_jobs : int or None, default=None
        Threads of the assignment kernels (None: all cores).
    random_state : int or None, default=None

    Attributes
    ----------
    vocabulary_ : KMeansVocabulary
    n_words_ : int
    signature_shape_ : tuple, the shape of one signature ((ceil(D/8),) or (D,))
    """

    def __init__(self, vocabulary=None, *, n_words=1024, binary=True, multiple_assignment=1, query_assignment=5,
                 max_descriptors=200_000, n_jobs=None, random_state=None):
        self.vocabulary = vocabulary
        self.n_words = n_words
        self.binary = binary
        self.multiple_assignment = multiple_assignment
        self.query_assignment = query_assignment
        self.max_descriptors = max_descriptors
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X=None, y=None):
        """Resolve the vocabulary (train one on X when ``vocabulary=None``).

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays, optional with a vocabulary given
        y : ignored

        Returns
        -------
        self
        """
        check_params(self, positive_ints=("n_words", "multiple_assignment", "query_assignment", "max_descriptors"),
                     choices={"binary": (True, False)})
        vocabulary = self.vocabulary
        if vocabulary is None:
            if X is None:
                raise ValueError("vocabulary=None trains one on X: give X to fit")
            vocabulary = KMeansVocabulary(self.n_words, max_descriptors=self.max_descriptors,
                                          random_state=self.random_state).fit(descriptor_sets(X))
        elif isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = load_vocabulary(vocabulary)
        if not isinstance(vocabulary, KMeansVocabulary):
            kind = type(vocabulary).__name__ if isinstance(vocabulary, _Vocabulary) else repr(vocabulary)
            raise TypeError(f"ASMKEncoder needs k-means words (a KMeansVocabulary or its file), got {kind}")
        check_is_fitted(vocabulary, "centers_")
        self.vocabulary_ = vocabulary
        centers = np.ascontiguousarray(vocabulary.centers_)
        self._centers = {np.dtype(np.float32): centers.astype(np.float32), np.dtype(np.float64): centers.astype(np.float64)}
        self._faiss_words = None
        self.n_words_ = len(centers)
        dim = centers.shape[1]
        self.signature_shape_ = ((dim + 7) // 8,) if self.binary else (dim,)
        if X is not None:
            dims = {s.shape[1] for s in descriptor_sets(X) if len(s)}
            if dims and dims != {vocabulary.descriptor_dim_}:
                raise ValueError(f"descriptors have dimension {sorted(dims)}, the vocabulary expects "
                                 f"{vocabulary.descriptor_dim_}")
        return self

    def transform(self, X):
        """The word signatures of indexed images (``multiple_assignment`` words a descriptor).

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays
            An image with no descriptors gives an empty set.

        Returns
        -------
        list of :class:`WordSignatures`, one per image
        """
        return self._encode(X, self.multiple_assignment)

    def transform_queries(self, X):
        """The word signatures of queries (``query_assignment`` words a descriptor)."""
        return self._encode(X, self.query_assignment)

    def _encode(self, X, m):
        check_is_fitted(self, "vocabulary_")
        sets = descriptor_sets(X)
        expected = self.vocabulary_.descriptor_dim_
        for index, descriptors in enumerate(sets):
            if len(descriptors) and descriptors.shape[1] != expected:
                raise ValueError(f"image {index}: descriptors have dimension {descriptors.shape[1]}, the "
                                 f"vocabulary expects {expected}")
        dtype = np.dtype(np.float64 if any(s.dtype == np.float64 for s in sets) else np.float32)
        m = min(m, self.n_words_)
        out = []
        # Images in groups of about CHUNK_ROWS descriptors: one faiss search and one
        # parallel aggregation per group, in buffers of bounded size (reused pages, not
        # one copy of every descriptor).
        group, rows = [], 0
        for descriptors in sets:
            group.append(descriptors)
            rows += len(descriptors)
            if rows >= CHUNK_ROWS:
                out += self._encode_group(group, m, dtype)
                group, rows = [], 0
        if group or not out:
            out += self._encode_group(group, m, dtype)
        return out

    def _encode_group(self, sets, m, dtype):
        offsets = np.zeros(len(sets) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sets], out=offsets[1:])
        rows = [s for s in sets if len(s)]
        X = np.ascontiguousarray(self.vocabulary_._project(np.concatenate(rows).astype(dtype, copy=False))
                                 if rows else np.zeros((0, self.vocabulary_.descriptor_dim_)), dtype=dtype)
        if not np.isfinite(X).all():
            raise ValueError("descriptors hold NaN or infinite values")
        assignments = self._assign(X, m)
        signatures = np.empty((len(X) * m,) + self.signature_shape_, dtype=np.uint8 if self.binary else np.float32)
        words = np.empty(len(X) * m, dtype=np.int64)
        counts = np.zeros(len(sets), dtype=np.int64)
        with numba_threads(self.n_jobs):  # (no BLAS inside these kernels: no BLAS limit to set)
            aggregate_images(X, offsets, assignments, self._centers[dtype], bool(self.binary), signatures, words,
                             counts)
        return [WordSignatures(words[first * m:first * m + count].copy(), signatures[first * m:first * m + count].copy())
                for first, count in zip(offsets[:-1].tolist(), counts.tolist())]

    def _assign(self, X, m):
        """The m nearest words of each row, nearest first: ``candidate_count(m)`` candidates
        by faiss (float32 inner products, BLAS, the whole batch at once), ranked again in
        float64 (:func:`~vladkit.kernels.nearest.exact_nearest`), so that float32 near ties
        are settled exactly, as the other encoders' assignments are."""
        if not len(X):
            return np.zeros((0, m), dtype=np.int64)
        if getattr(self, "_faiss_words", None) is None:
            load_faiss()
            import faiss

            self._faiss_words = faiss.IndexFlatL2(self._centers[np.dtype(np.float32)].shape[1])
            self._faiss_words.add(self._centers[np.dtype(np.float32)])
        _, candidates = self._faiss_words.search(np.ascontiguousarray(X, dtype=np.float32),
                                                 candidate_count(m, self.n_words_))
        neighbors = np.empty((len(X), m), dtype=np.int64)
        with numba_threads(self.n_jobs):  # (no BLAS inside these kernels: no BLAS limit to set)
            exact_nearest(X, self._centers[np.dtype(np.float64)], candidates.astype(np.int64), neighbors,
                          np.empty((len(X), m)))
        return neighbors

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_faiss_words", None)  # a faiss object does not pickle; rebuilt on first use
        return state
