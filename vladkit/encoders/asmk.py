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
MATLAB original (``gtolias/asmk``, Hamming embedding from yael) instead compares the
image's *mean* descriptor of the word with a per-word, per-dimension median t_c learnt
on training descriptors, bits ``[V(X_c) / |X_c| - t_c > 0]`` (t_c here the median of the
training residuals x - q_c; ``binarize="median"``; yael also rotates the descriptors by
a random orthogonal matrix first, which is not done here). The package's plain signs are
the default the comparisons are made with.

Each descriptor's words are its exact nearest (in float64) among all K, found from one
float32 BLAS product per chunk of rows (``quantizer="flat"``), or, with
``quantizer="hnsw"``, its float64 ranking among the candidates a faiss HNSW graph over
the words returns: approximate (a word the graph misses is replaced by the next), faster
for large vocabularies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .._util.threads import limit_threads, single_threaded_blas
from .._util.blas import load_faiss
from ..kernels.asmk_words import (aggregate_all, aggregate_signatures, nearest_in_blocks, nearest_rows,
                                  rank_candidate_rows)
from ..kernels.nearest import candidate_count, exact_nearest, nearest_constants
from ..kernels.products import squared_norms
from ..vocabulary.base import _Vocabulary
from ..vocabulary.kmeans import KMeansVocabulary
from ..vocabulary.loading import load_vocabulary
from ._base import CHUNK_ROWS, check_params, descriptor_sets, sample_rows

__all__ = ["ASMKEncoder", "WordSignatures"]

#: Rows assigned in the calling thread, on one BLAS (or faiss) thread: a query's. Waking a
#: pool of threads for so little work costs more than it saves, and on a busy machine a
#: 2-thread BLAS product of 56 x 128 by 128 x 4096 was measured 3-8 times slower than on
#: one thread (0.8-1.1 ms), each thread waiting for the other to be scheduled.
SMALL_ROWS = 256

#: Products a parallel task holds (rows per task: this / K, at least 64): larger BLAS
#: calls than the encoders' 2^18 (measured: 256 rows of 4096 words 10% faster than 64).
BLOCK_PRODUCTS = 1 << 20


@dataclass(frozen=True, eq=False)
class WordSignatures:
    """One image for ASMK: the visual words it holds and a signature per word.

    Attributes
    ----------
    words : (n,) int64 ndarray
        The distinct words, increasing (from :class:`~vladkit.encoders.smk.SMKEncoder`:
        one per descriptor and assigned word, repeated, non-decreasing).
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
    binarize : {"sign", "median"}, default="sign"
        ASMK*'s bits. "sign": b = [V(X_c) > 0] (the package ``asmk``). "median": the
        MATLAB original's ``b = [V(X_c) / |X_c| > t_c]``, ``|X_c|`` the image's descriptors
        assigned to word c and t_c the per-dimension median of the residuals x - q_c of
        the training descriptors whose nearest word is c (learnt in :meth:`fit`, on at
        most ``max_descriptors`` of them; 0 for a word none is nearest to). Needs X in
        :meth:`fit` and ``binary=True``.
    multiple_assignment : int, default=1
        m for the indexed images (:meth:`transform`): each descriptor's residual goes to its
        m nearest words.
    query_assignment : int, default=5
        m for queries (:meth:`transform_queries`).
    quantizer : {"flat", "hnsw"}, default="flat"
        How the m nearest words are found. "flat": exactly (the float64 ranking over all
        K words; a float32 BLAS product decides, and rows where float32 rounding could
        change the order are ranked again in float64). "hnsw": a faiss ``IndexHNSWFlat``
        graph over the words (32 links a node, efConstruction 200, built in :meth:`fit`)
        returns ``m + 4`` candidates, ranked again in float64: approximate, a nearest word
        the graph misses is replaced by the next one.
    ef_search : int, default=32
        The HNSW search's queue length (faiss's efSearch, at least ``m + 4``): larger is
        closer to exact and slower. Only with ``quantizer="hnsw"``.
    max_descriptors : int, default=200_000
        Training sample of a vocabulary trained in :meth:`fit`, and of the medians.
    n_jobs : int or None, default=None
        Threads of the assignment (BLAS, faiss and numba; None: as the libraries set them,
        all cores).
    random_state : int or None, default=None

    Attributes
    ----------
    vocabulary_ : KMeansVocabulary
    n_words_ : int
    signature_shape_ : tuple, the shape of one signature ((ceil(D/8),) or (D,))
    medians_ : (n_words, D) float32 ndarray or None
        t_c of ``binarize="median"`` (in the vocabulary's projected space); None otherwise.
    """

    def __init__(self, vocabulary=None, *, n_words=1024, binary=True, binarize="sign", multiple_assignment=1,
                 query_assignment=5, quantizer="flat", ef_search=32, max_descriptors=200_000, n_jobs=None,
                 random_state=None):
        self.vocabulary = vocabulary
        self.n_words = n_words
        self.binary = binary
        self.binarize = binarize
        self.multiple_assignment = multiple_assignment
        self.query_assignment = query_assignment
        self.quantizer = quantizer
        self.ef_search = ef_search
        self.max_descriptors = max_descriptors
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X=None, y=None):
        """Resolve the vocabulary (train one on X when ``vocabulary=None``), build the
        quantizer, and learn the medians of ``binarize="median"`` on X.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays, optional with a vocabulary given
            and ``binarize="sign"``
        y : ignored

        Returns
        -------
        self
        """
        check_params(self, positive_ints=("n_words", "multiple_assignment", "query_assignment", "ef_search",
                                          "max_descriptors"),
                     choices={"binary": (True, False), "binarize": ("sign", "median"), "quantizer": ("flat", "hnsw")})
        if self.binarize == "median" and not self.binary:
            raise ValueError('binarize="median" sets the bits of ASMK*: it needs binary=True')
        if self.binarize == "median" and X is None:
            raise ValueError('binarize="median" learns its medians on training descriptors: give X to fit')
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
        self.n_words_ = len(vocabulary.centers_)
        dim = vocabulary.centers_.shape[1]
        self.signature_shape_ = ((dim + 7) // 8,) if self.binary else (dim,)
        self._words = {}
        self._hnsw = None
        self.medians_ = None
        if X is not None:
            sets = descriptor_sets(X)
            dims = {s.shape[1] for s in sets if len(s)}
            if dims and dims != {vocabulary.descriptor_dim_}:
                raise ValueError(f"descriptors have dimension {sorted(dims)}, the vocabulary expects "
                                 f"{vocabulary.descriptor_dim_}")
            if self.binarize == "median":
                self.medians_ = self._learn_medians(sets)
        if self.quantizer == "hnsw":
            self._build_hnsw()
        return self

    def _learn_medians(self, sets):
        """t_c: per word, the per-dimension median of x - q_c over the training descriptors
        (a sample of at most ``max_descriptors``) whose nearest word is c, in the exact
        assignment (whatever the ``quantizer``); 0 for a word none is nearest to."""
        if not any(len(s) for s in sets):
            raise ValueError('binarize="median" learns its medians on training descriptors: X holds none')
        seed = 0 if self.random_state is None else int(np.random.RandomState(self.random_state).randint(2**31 - 1))
        X = np.ascontiguousarray(self.vocabulary_._project(sample_rows(sets, self.max_descriptors, seed)),
                                 dtype=np.float32)
        with limit_threads(self.n_jobs):
            labels = self._assign_flat(X, 1)[:, 0]
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.n_words_ + 1))
        residuals = X[order] - self._prepared(np.dtype(np.float32))["centers"][labels[order]]
        medians = np.zeros((self.n_words_, X.shape[1]), dtype=np.float32)
        for word in np.flatnonzero(np.diff(bounds)):
            medians[word] = np.median(residuals[bounds[word]:bounds[word + 1]], axis=0)
        return medians

    def _build_hnsw(self):
        load_faiss()
        import faiss

        centers = self._prepared(np.dtype(np.float32))["centers"]
        graph = faiss.IndexHNSWFlat(centers.shape[1], 32)
        graph.hnsw.efConstruction = 200
        # One thread: faiss builds the graph in parallel in an order that varies from run
        # to run; one thread gives the same graph (and the same words) every time.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            graph.add(centers)
        finally:
            faiss.omp_set_num_threads(threads)
        self._hnsw = graph

    def _prepared(self, dtype):
        """The words as the kernels take them, for rows of ``dtype``: (K, D) and their
        (D, K) transpose in that dtype, ||c||^2, the float64 words and the rounding
        constants of :func:`~vladkit.kernels.nearest.nearest_word`. Made once per dtype."""
        words = self.__dict__.setdefault("_words", {})
        if dtype not in words:
            centers64 = np.ascontiguousarray(self.vocabulary_.centers_, dtype=np.float64)
            centers = np.ascontiguousarray(centers64.astype(dtype))
            words[dtype] = {"centers": centers, "centers_t": np.ascontiguousarray(centers.T),
                            "sqnorm": squared_norms(centers), "centers64": centers64,
                            "constants": nearest_constants(dtype, centers64)}
        return words[dtype]

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
        # Images in groups of about CHUNK_ROWS descriptors: one assignment and one
        # parallel aggregation per group, in buffers of bounded size (reused pages, not
        # one copy of every descriptor).
        group, rows = [], 0
        with limit_threads(self.n_jobs):
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
        if len(rows) == 1:
            X = rows[0].astype(dtype, copy=False)  # (a query: no copy to concatenate)
        elif rows:
            X = np.concatenate(rows).astype(dtype, copy=False)
        else:
            X = np.zeros((0, self.vocabulary_.descriptor_dim_))
        X = np.ascontiguousarray(self.vocabulary_._project(X), dtype=dtype)
        if not np.isfinite(X).all():
            raise ValueError("descriptors hold NaN or infinite values")
        assignments = self._assign(X, m)
        centers = self._prepared(dtype)["centers"]
        binary = bool(self.binary)
        medians = getattr(self, "medians_", None)
        if medians is None:
            medians = np.zeros((0, X.shape[1]), dtype=np.float32)  # (plain signs)
        signatures = np.empty((len(X) * m,) + self.signature_shape_, dtype=np.uint8 if binary else np.float32)
        words = np.empty(len(X) * m, dtype=np.int64)
        if len(sets) == 1:
            # One image (a query): aggregated in this thread, in buffers of its size.
            count = aggregate_signatures(X, assignments, centers, binary, medians, signatures, words)
            return [WordSignatures(words[:count], signatures[:count])]
        counts = np.zeros(len(sets), dtype=np.int64)
        aggregate_all(X, offsets, assignments, centers, binary, medians, signatures, words, counts)
        return [WordSignatures(words[first * m:first * m + count].copy(),
                               signatures[first * m:first * m + count].copy())
                for first, count in zip(offsets[:-1].tolist(), counts.tolist())]

    def _assign(self, X, m):
        """The m nearest words of each row, nearest first (ties: the lower word), by the
        ``quantizer``: (n, m) int64."""
        if not len(X):
            return np.zeros((0, m), dtype=np.int64)
        if self.quantizer == "hnsw":
            return self._assign_hnsw(X, m)
        return self._assign_flat(X, m)

    def _assign_flat(self, X, m):
        """Exact: the products X C^T by BLAS in X's dtype, then each row's words from its
        products (:func:`~vladkit.kernels.asmk_words.nearest_rows`): for m = 1 the float64
        nearest word (the argmin of ||c||^2 - 2 x.c, decided again in float64 when float32
        rounding could have changed it), for m > 1 the m + 4 smallest scores ranked again
        in float64, so that float32 near ties are settled exactly, as the other encoders'
        assignments are.

        BLAS runs on one thread: a query's few rows are done in this thread (one product;
        waking BLAS's or numba's pools costs more than it saves on a busy machine), more
        rows in parallel over blocks, a BLAS call in each numba task
        (:func:`~vladkit.kernels.asmk_words.nearest_in_blocks`)."""
        words = self._prepared(X.dtype)
        n_candidates = candidate_count(m, self.n_words_)
        neighbors = np.empty((len(X), m), dtype=np.int64)
        with single_threaded_blas():
            if len(X) <= SMALL_ROWS:
                nearest_rows(X, X @ words["centers_t"], words["sqnorm"], words["centers64"], words["constants"],
                             n_candidates, neighbors)
            else:
                nearest_in_blocks(X, words["centers_t"], words["sqnorm"], words["centers64"], words["constants"],
                                  n_candidates, max(64, BLOCK_PRODUCTS // self.n_words_), neighbors)
        return neighbors

    def _assign_hnsw(self, X, m):
        """Approximate: ``candidate_count(m)`` candidates from the HNSW graph (float32),
        ranked again in float64 (:func:`~vladkit.kernels.nearest.exact_nearest`). A row the
        graph finds too few words for (it does not happen with efSearch >= m + 4 on a
        connected graph) is assigned exactly."""
        if getattr(self, "_hnsw", None) is None:
            self._build_hnsw()
        import faiss

        n_candidates = candidate_count(m, self.n_words_)
        self._hnsw.hnsw.efSearch = max(int(self.ef_search), n_candidates)
        # A query's rows on one OpenMP thread (SMALL_ROWS); omp_set_num_threads sets the
        # calling thread's own value, so concurrent callers do not see it.
        threads = faiss.omp_get_max_threads()
        if len(X) <= SMALL_ROWS:
            faiss.omp_set_num_threads(1)
        try:
            _, candidates = self._hnsw.search(np.ascontiguousarray(X, dtype=np.float32), n_candidates)
        finally:
            faiss.omp_set_num_threads(threads)
        missing = (candidates < 0).any(axis=1)
        candidates[missing] = np.arange(n_candidates)  # (placeholders: assigned exactly below)
        neighbors = np.empty((len(X), m), dtype=np.int64)
        centers64 = self._prepared(X.dtype)["centers64"]
        if len(X) <= SMALL_ROWS:
            rank_candidate_rows(X, centers64, candidates, neighbors)
        else:
            exact_nearest(X, centers64, candidates, neighbors, np.empty((len(X), m)))
        if missing.any():
            neighbors[missing] = self._assign_flat(np.ascontiguousarray(X[missing]), m)
        return neighbors

    def __getstate__(self):
        state = dict(self.__dict__)
        # A faiss object does not pickle, and the prepared words are copies of the
        # vocabulary's: both are made again on first use.
        state.pop("_hnsw", None)
        state.pop("_words", None)
        return state
