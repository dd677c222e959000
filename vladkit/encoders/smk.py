"""Non-aggregated selective match kernel signatures (SMK, SMK*; Tolias, Avrithis & Jégou,
ICCV 2013) and Hamming embedding codes (Jégou, Douze & Schmid, ECCV 2008): one signature
per descriptor and assigned word, for :class:`vladkit.retrieval.smk_index.SMKIndex`.

- SMK: phi(x) = r / ||r||, r = x - q_c the residual to the word (0 when r = 0), float32.
- SMK*: the bits [r - t_c > 0] packed, most significant first; t_c = 0 (``binarize="sign"``)
  or the per-word, per-dimension median of training residuals (``binarize="median"``), as
  :class:`~vladkit.encoders.asmk.ASMKEncoder`'s.
- Hamming embedding (``hamming=True``): z = P x, P a random orthogonal projection
  (``n_bits`` x D, rows orthonormal, one for all words, drawn from ``random_state``), and
  the bits [z_i > m_{c,i}], m_c the per-word, per-bit medians of P x over the training
  descriptors whose nearest word is c (learnt in :meth:`SMKEncoder.fit`; 0 for a word
  none is nearest to). x is the descriptor itself, not its residual (as COLMAP's).

Words are assigned as ASMKEncoder's (exact, or HNSW), which this class extends.
"""

from __future__ import annotations

import numpy as np

from .._util.threads import limit_threads
from ._base import descriptor_sets, sample_rows
from .asmk import ASMKEncoder, WordSignatures

__all__ = ["SMKEncoder"]


class SMKEncoder(ASMKEncoder):
    """Per-descriptor signatures (SMK, SMK*, Hamming embedding) of descriptor sets.

    :meth:`transform` gives, per image, a :class:`~vladkit.encoders.asmk.WordSignatures`
    with one entry per descriptor and assigned word: words repeat, non-decreasing (a
    word's entries in descriptor order).

    Parameters
    ----------
    vocabulary, n_words, binary, binarize, multiple_assignment, query_assignment,
    quantizer, ef_search, max_descriptors, n_jobs, random_state
        As :class:`~vladkit.encoders.asmk.ASMKEncoder`'s (``binary`` and ``binarize`` are
        ignored with ``hamming=True``).
    hamming : bool, default=False
        Hamming embedding codes of ``n_bits`` bits rather than residual signatures. Needs
        X in :meth:`fit` (the medians).
    n_bits : int, default=64
        B of Hamming embedding: a multiple of 8, at most the descriptors' dimension.

    Attributes
    ----------
    projection_ : (n_bits, D) float32 ndarray or None
        P of Hamming embedding.
    he_medians_ : (n_words, n_bits) float32 ndarray or None
        m_c of Hamming embedding.
    """

    def __init__(self, vocabulary=None, *, n_words=1024, binary=True, binarize="sign", hamming=False, n_bits=64,
                 multiple_assignment=1, query_assignment=5, quantizer="flat", ef_search=32,
                 max_descriptors=200_000, n_jobs=None, random_state=None):
        super().__init__(vocabulary, n_words=n_words, binary=binary, binarize=binarize,
                         multiple_assignment=multiple_assignment, query_assignment=query_assignment,
                         quantizer=quantizer, ef_search=ef_search, max_descriptors=max_descriptors, n_jobs=n_jobs,
                         random_state=random_state)
        self.hamming = hamming
        self.n_bits = n_bits

    def fit(self, X=None, y=None):
        """As :meth:`ASMKEncoder.fit`; with ``hamming=True`` also draw P and learn the
        medians m_c on X (a sample of at most ``max_descriptors``)."""
        if self.hamming not in (True, False):
            raise ValueError(f"hamming must be True or False, got {self.hamming!r}")
        if not self.hamming:
            super().fit(X)
            self.projection_ = self.he_medians_ = None
            return self
        if X is None:
            raise ValueError("hamming=True learns its medians on training descriptors: give X to fit")
        # The residual settings do not apply: fit as plain-sign ASMK* for the words.
        binary, binarize = self.binary, self.binarize
        self.binary, self.binarize = True, "sign"
        try:
            super().fit(X)
        finally:
            self.binary, self.binarize = binary, binarize
        dim = self.vocabulary_.centers_.shape[1]
        n_bits = self.n_bits
        if not isinstance(n_bits, (int, np.integer)) or n_bits < 8 or n_bits % 8 or n_bits > dim:
            raise ValueError(f"n_bits must be a multiple of 8 in 8..{dim} (the dimension), got {n_bits!r}")
        rng = np.random.RandomState(self.random_state if self.random_state is not None else 0)
        # Orthonormal rows: the Q of a Gaussian matrix's QR (signs fixed by R's diagonal,
        # so the draw is uniform over rotations).
        q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
        self.projection_ = np.ascontiguousarray((q * np.sign(np.diag(r)))[:, :n_bits].T, dtype=np.float32)
        self.signature_shape_ = (n_bits // 8,)
        sets = [s for s in descriptor_sets(X) if len(s)]
        if not sets:
            raise ValueError("hamming=True learns its medians on training descriptors: X holds none")
        sample = np.ascontiguousarray(self.vocabulary_._project(sample_rows(sets, self.max_descriptors, 0)),
                                      dtype=np.float32)
        with limit_threads(self.n_jobs):
            labels = self._assign_flat(sample, 1)[:, 0]
        z = sample @ self.projection_.T
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.n_words_ + 1))
        z = z[order]
        self.he_medians_ = np.zeros((self.n_words_, n_bits), dtype=np.float32)
        for word in np.flatnonzero(np.diff(bounds)):
            self.he_medians_[word] = np.median(z[bounds[word]:bounds[word + 1]], axis=0)
        return self

    def _encode_group(self, sets, m, dtype):
        """One entry per (descriptor, assigned word), an image's entries ordered by word,
        then descriptor (a stable sort)."""
        sizes = np.array([len(s) for s in sets], dtype=np.int64)
        rows = [s for s in sets if len(s)]
        X = np.concatenate(rows).astype(dtype, copy=False) if rows else \
            np.zeros((0, self.vocabulary_.descriptor_dim_), dtype=dtype)
        X = np.ascontiguousarray(self.vocabulary_._project(X), dtype=dtype)
        if not np.isfinite(X).all():
            raise ValueError("descriptors hold NaN or infinite values")
        words = self._assign(X, m).ravel()           # descriptor-major: row i's m words
        owners = np.repeat(np.arange(len(X)), m)
        if getattr(self, "projection_", None) is not None:
            z = X.astype(np.float32) @ self.projection_.T
            signatures = np.packbits(z[owners] > self.he_medians_[words], axis=1)
        else:
            residuals = X[owners] - self._prepared(dtype)["centers"][words]
            if self.binary:
                medians = self.medians_[words] if self.medians_ is not None else 0
                signatures = np.packbits(residuals - medians > 0, axis=1)
            else:
                norms = np.linalg.norm(residuals, axis=1, keepdims=True)
                signatures = np.divide(residuals, norms, out=np.zeros_like(residuals), where=norms > 0)
                signatures = signatures.astype(np.float32)
        images = np.repeat(np.arange(len(sets)), sizes * m)
        order = np.lexsort((words, images))          # by image, then word; stable
        bounds = np.concatenate([[0], np.cumsum(sizes * m)])
        words, signatures = words[order], signatures[order]
        return [WordSignatures(words[a:b].copy(), signatures[a:b].copy())
                for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

