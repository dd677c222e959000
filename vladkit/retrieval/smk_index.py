"""An inverted file of non-aggregated descriptor signatures: the selective match kernel
without aggregation (SMK, SMK*; Tolias, Avrithis & Jégou, ICCV 2013) and Hamming
embedding with burstiness (Jégou, Douze & Schmid, ECCV 2008 and CVPR 2009).

SMK compares every pair of descriptors two images assign to the same word,

    K(X, Y) = gamma(X) gamma(Y) sum_c w_c M(X_c, Y_c),
    M(X_c, Y_c) = sum_{x in X_c} sum_{y in Y_c} sigma_alpha(u(x, y)),
    gamma(X) = (sum_c w_c M(X_c, X_c))^(-1/2),

u the inner product of the unit residuals (SMK) or 1 - 2 h / B of their packed sign bits
(SMK*), sigma_alpha(u) = sign(u) |u|^alpha where u >= tau, else 0; w_c = 1 or, with idf,
log(N / n_c)^2 (n_c the images holding word c). gamma sums the self-similarity over all
pairs within each word, so an image's bursts (many similar descriptors in one word) are
paid for in its normaliser, computed when the inverted file is laid out (for a query,
when it is searched).

With ``hamming=True`` (Hamming embedding, weighted as COLMAP's retrieval does) a pair
matches when its Hamming distance h <= h_t and weighs exp(-h^2 / sigma^2); with
``burstiness=True`` a query descriptor t's votes in image x are divided by the square
root of their number (Arandjelovic & Zisserman, ACCV 2014, eq. 2, as COLMAP's
``InvertedFile::ScoreFeature``):

    K(Q, X) = gamma(Q) gamma(X) sum_{t in Q} w_c(t) sum_{y in X_c(t), h <= h_t} exp(-h^2/sigma^2) / sqrt(v(t, X)),

v(t, X) = #{y in X_c(t) : h(t, y) <= h_t}, w_c = idf^2 = log(N / n_c)^2 with ``idf=True``,
and the normaliser COLMAP's ``ComputeImageSelfSimilarities``: every descriptor matched
with itself only, gamma(X) = (sum_{x in X} w_c(x))^(-1/2).

The layout is :class:`~vladkit.retrieval.asmk_index.ASMKIndex`'s (CSR by word, images
non-decreasing within a list, an image's entries of a word next to each other), and so
is most of the code: this class subclasses it. Saving is not supported yet.
"""

from __future__ import annotations

import numpy as np

from ..kernels.asmk import score_scratch, selectivity_table
from ..kernels.smk import hamming_table, score_smk_queries, self_similarities
from .asmk_index import ASMKIndex, _numba_threads, _refuse, _word_signatures_class

__all__ = ["SMKIndex"]


class SMKIndex(ASMKIndex):
    """Inverted file of per-descriptor :class:`~vladkit.encoders.asmk.WordSignatures`
    (from :class:`~vladkit.encoders.smk.SMKEncoder`: words repeat, non-decreasing),
    searched with SMK / SMK* or Hamming embedding.

    Parameters
    ----------
    alpha : float, default=3.0
        Selectivity exponent (SMK, SMK*).
    threshold : float, default=0.0
        tau: a pair counts when its similarity is at least tau (SMK, SMK*).
    idf : bool, default=False
        w_c = log(N / n_c)^2, n_c the images holding word c (not its entries).
    hamming : bool, default=False
        Hamming embedding's weight exp(-h^2 / sigma^2) for h <= ``max_distance`` instead
        of sigma_alpha, and COLMAP's normaliser gamma(X) = (sum_{x in X} w_c(x))^(-1/2)
        instead of SMK's all-pairs one. Needs binary signatures.
    max_distance : int, default=24
        h_t of Hamming embedding (of 64 bits).
    sigma : float, default=16.0
        Of Hamming embedding's weight.
    burstiness : bool, default=False
        Divide a query descriptor's summed votes in an image by the square root of their
        number (a vote: a pair of non-zero weight). COLMAP's HE uses it (with idf=True).

    Examples
    --------
    HE as COLMAP: ``SMKIndex(hamming=True, burstiness=True, idf=True)`` over
    ``SMKEncoder(hamming=True)``'s 64-bit codes.
    """

    def __init__(self, *, alpha=3.0, threshold=0.0, idf=False, hamming=False, max_distance=24, sigma=16.0,
                 burstiness=False):
        super().__init__(alpha=alpha, threshold=threshold, idf=idf)
        self.hamming = hamming
        self.max_distance = max_distance
        self.sigma = sigma
        self.burstiness = burstiness

    def _check_set(self, item, where):
        # The aggregated index's checks (type, dtype and shape, word range) on the item's
        # distinct words; the repeats, non-decreasing, here.
        cls = _word_signatures_class()
        if not isinstance(item, cls):
            raise TypeError(f"{where}: expected WordSignatures (from SMKEncoder), got {type(item).__name__}")
        words, signatures = np.asarray(item.words), np.asarray(item.signatures)
        if words.ndim != 1 or len(words) != len(signatures) or (len(words) and np.any(np.diff(words) < 0)):
            raise ValueError(f"{where}: words must be non-decreasing, non-negative, one per signature")
        if self.hamming and signatures.dtype != np.uint8:
            raise ValueError(f"{where}: hamming=True needs binary signatures")
        distinct = np.unique(words)
        super()._check_set(cls(distinct, signatures[:len(distinct)]), where)

    def _table(self):
        alpha, threshold = self._check_params()
        if self.hamming:
            if not isinstance(self.max_distance, (int, np.integer)) or self.max_distance < 0:
                raise ValueError(f"max_distance must be a non-negative integer, got {self.max_distance!r}")
            if not float(self.sigma) > 0:
                raise ValueError(f"sigma must be positive, got {self.sigma!r}")
            return hamming_table(self._n_bits(), self.max_distance, self.sigma), alpha, threshold
        return selectivity_table(self._n_bits(), alpha, threshold), alpha, threshold

    def _weights(self, offsets, entry_images, entry_signatures):
        n_images = len(self._ids)
        counts = np.diff(offsets)
        entry_words = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        weights = np.ones(len(counts))
        if self.idf:
            # n_c: images, not entries: an image starts a run where the word starts or the
            # image changes (lists are sorted by image).
            starts = np.ones(len(entry_images), dtype=bool)
            starts[1:] = (entry_words[1:] != entry_words[:-1]) | (entry_images[1:] != entry_images[:-1])
            holders = np.bincount(entry_words[starts], minlength=len(counts))
            held = holders > 0
            weights[held] = np.log(n_images / holders[held]) ** 2
        norms = self._norms(entry_words, entry_images, entry_signatures, weights, n_images)
        scales = np.zeros(n_images)
        np.divide(1.0, np.sqrt(norms), out=scales, where=norms > 0)
        return {"word_offsets": offsets, "entry_images": entry_images, "entry_signatures": entry_signatures,
                "image_scales": scales, "word_weights": weights}

    def _norms(self, words, images, signatures, weights, n_images):
        """gamma^-2 of each image (see the module's docstring)."""
        table, alpha, threshold = self._table() if self._signature else (np.ones(1), 3.0, 0.0)
        norms = np.zeros(n_images)
        if len(words):
            self_similarities(words, images, _wide(signatures), weights, table, alpha, threshold,
                              not self.hamming, norms)
        return norms

    def search(self, query_sets, k=10):
        """The ``k`` indexed images most similar to each query (as
        :meth:`ASMKIndex.search`: scores (n, k) float32 decreasing, ids; an image or query
        without descriptors scores 0)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = list(query_sets)
        for index, item in enumerate(queries):
            self._check_set(item, f"query {index}")
        n, k = len(queries), min(int(k), len(self))
        if not n or not k:
            return np.zeros((n, k), dtype=np.float32), [[] for _ in range(n)]
        arrays = self._layout()
        table, alpha, threshold = self._table()
        sizes = np.array([len(q) for q in queries], dtype=np.int64)
        q_offsets = np.concatenate([[0], np.cumsum(sizes)])
        q_words = np.concatenate([np.asarray(q.words, dtype=np.int64) for q in queries])
        q_signatures = _wide(np.concatenate([q.signatures for q in queries]))
        q_norms = self._norms(q_words, np.repeat(np.arange(n), sizes), q_signatures, arrays["word_weights"], n)
        q_scales = np.zeros(n)
        np.divide(1.0, np.sqrt(q_norms), out=q_scales, where=q_norms > 0)
        scores, images = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
        scratch = score_scratch(max(1, min(n, _numba_threads())), arrays["image_scales"])
        damaged = score_smk_queries(q_offsets, q_words, q_signatures, q_scales, arrays["word_offsets"],
                                    arrays["entry_images"], _wide(arrays["entry_signatures"]),
                                    arrays["word_weights"], table, alpha, threshold, bool(self.burstiness),
                                    scratch, scores, images)
        if damaged >= 0:
            _refuse(f"the inverted list of word {damaged} holds image numbers out of range or decreasing")
        return scores.astype(np.float32), [[self._ids[j] for j in row] for row in images.tolist()]

    def save(self, folder, extra_files=None):
        raise NotImplementedError("SMKIndex cannot be saved yet (ASMKIndex's folders hold no SMK settings)")

    @classmethod
    def load(cls, folder, *, mmap=True):
        raise NotImplementedError("SMKIndex cannot be loaded yet")


def _wide(signatures):
    """Packed bits 64 at a time (the kernels' popcount) when their bytes allow it."""
    if signatures.dtype == np.uint8 and signatures.shape[1] % 8 == 0:
        return np.ascontiguousarray(signatures).view(np.uint64)
    return np.ascontiguousarray(signatures)
