"""An inverted file of word signatures, searched with the selective match kernels (ASMK,
ASMK*; Tolias, Avrithis & Jégou, ICCV 2013): the index kind beside
:class:`~vladkit.retrieval.index.VectorIndex` for sets of local descriptors.

The similarity of a query q and an indexed image x is

    K(q, x) = gamma(q) gamma(x) sum_{c in q and x} w_c sigma_alpha(u(q_c, x_c)),

u the similarity of the two images' signatures for word c (1 - 2 h / B for B-bit
signatures at Hamming distance h; the inner product of unit vectors otherwise),
sigma_alpha(u) = sign(u) |u|^alpha where u >= tau, else 0 (alpha = 3, tau = 0 by default),
w_c = 1, or idf: w_c = log(N / n_c)^2 (N images, n_c of them holding word c), and
gamma(x) = (sum_{c in x} w_c)^(-1/2), since a signature's self-similarity is 1.

Layout: the inverted lists laid end to end by word (CSR): ``word_offsets`` (n_words + 1),
then per entry its image (``entry_images``, int32) and signature (``entry_signatures``);
per image its gamma (``image_scales``); per word its weight (``word_weights``). Saved as
``.npy`` files and JSON in a folder, written into a temporary sibling and renamed into
place; loaded memory-mapped, so a large index costs page cache, not resident memory.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._version import __version__
from ..encoders.asmk import WordSignatures
from ..kernels.asmk import count_words, scatter_entries, score_queries, selectivity_table
from .index_files import (_INDEX_FILES, IDS_FILE, INDEX_FORMAT, METADATA_FILE, IndexFileError, _json_bytes, _read_json,
                          _write_file, index_folder_writer)

__all__ = ["ASMKIndex"]

ASMK_FORMAT = "vladkit-asmk-index"
ASMK_FORMAT_VERSION = 1
#: name -> (dtype, dimensions) of the arrays of a saved index.
ARRAYS = {
    "word_offsets": ("int64", 1),
    "entry_images": ("int32", 1),
    "entry_signatures": (None, 2),
    "image_scales": ("float64", 1),
    "word_weights": ("float64", 1),
}
ASMK_FILES = (METADATA_FILE, IDS_FILE, *(f"{name}.npy" for name in ARRAYS))


class ASMKIndex:
    """Inverted file of :class:`~vladkit.encoders.asmk.WordSignatures`, searched with ASMK.

    Parameters
    ----------
    alpha : float, default=3.0
        Selectivity exponent.
    threshold : float, default=0.0
        tau: a word pair counts when its similarity is at least tau.
    idf : bool, default=False
        Weigh word c by log(N / n_c)^2 (the ``asmk`` package's ``use_idf``).

    Images are added with :meth:`add` (any number of calls); the inverted file is laid
    out when first searched or saved, and again after more are added.
    """

    def __init__(self, *, alpha=3.0, threshold=0.0, idf=False):
        self.alpha = alpha
        self.threshold = threshold
        self.idf = idf
        self._ids = []
        self._id_set = set()
        self._pending = []          # (words, images, signatures) chunks not yet laid out
        self._arrays = None         # the laid-out inverted file (dict of ARRAYS)
        self._signature = None      # (dtype, shape) of one signature

    def __len__(self):
        return len(self._ids)

    @property
    def binary(self):
        return self._signature is not None and self._signature[0] == np.uint8

    # -- adding ----------------------------------------------------------------------

    def add(self, signature_sets, ids):
        """Add images under string ids.

        Parameters
        ----------
        signature_sets : list of WordSignatures (from :meth:`ASMKEncoder.transform`)
        ids : sequence of str, one per set, unique in the index

        Returns
        -------
        self
        """
        sets = list(signature_sets)
        ids = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in ids]
        if len(ids) != len(sets):
            raise ValueError(f"{len(ids)} ids for {len(sets)} signature sets")
        if not all(isinstance(i, str) for i in ids):
            raise TypeError("ids must be strings (or paths)")
        seen = set()
        duplicates = [i for i in ids if i in self._id_set or (i in seen or seen.add(i))]
        if duplicates:
            raise ValueError(f"duplicate ids ({len(duplicates)}, e.g. {duplicates[0]!r}): each id must be unique")
        for index, item in enumerate(sets):
            self._check_set(item, f"signature set {index}")
        first = len(self._ids)
        if sets:
            words = np.concatenate([np.asarray(s.words, dtype=np.int64) for s in sets])
            images = np.repeat(np.arange(first, first + len(sets), dtype=np.int32), [len(s) for s in sets])
            signatures = np.concatenate([s.signatures for s in sets]) if len(words) else \
                np.zeros((0,) + self._signature[1], self._signature[0])
            self._pending.append((words, images, signatures))
        self._ids.extend(ids)
        self._id_set.update(ids)
        return self

    def _check_set(self, item, where):
        if not isinstance(item, WordSignatures):
            raise TypeError(f"{where}: expected WordSignatures (from ASMKEncoder), got {type(item).__name__}")
        signatures = np.asarray(item.signatures)
        kind = (signatures.dtype, signatures.shape[1:])
        if signatures.dtype not in (np.uint8, np.float32) or signatures.ndim != 2:
            raise ValueError(f"{where}: signatures must be (n, bytes) uint8 or (n, D) float32, got "
                             f"{signatures.dtype} of shape {signatures.shape}")
        if self._signature is None:
            self._signature = kind
        elif kind != self._signature:
            raise ValueError(f"{where}: signatures of {kind[0]} x {kind[1]}, this index holds "
                             f"{self._signature[0]} x {self._signature[1]} (another encoder's settings)")
        words = np.asarray(item.words)
        if words.ndim != 1 or len(words) != len(signatures) or (len(words) and (
                words.min() < 0 or np.any(np.diff(words) <= 0))):
            raise ValueError(f"{where}: words must be distinct, increasing, non-negative, one per signature")

    # -- the inverted file -----------------------------------------------------------

    def _layout(self):
        """Lay the pending entries out by word (a counting sort), merged with those laid
        out before; compute the word weights and the image normalisers."""
        if self._arrays is not None and not self._pending:
            return self._arrays
        chunks = list(self._pending)
        if self._arrays is not None:
            old = self._arrays
            counts = np.diff(old["word_offsets"])
            chunks.insert(0, (np.repeat(np.arange(len(counts), dtype=np.int64), counts),
                              np.asarray(old["entry_images"]), np.asarray(old["entry_signatures"])))
        n_words = max([int(w.max()) + 1 for w, _, _ in chunks if len(w)] or [0])
        counts = np.zeros(n_words, dtype=np.int64)
        for words, _, _ in chunks:
            count_words(words, n_words, counts)
        offsets = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        dtype, shape = self._signature if self._signature else (np.dtype(np.uint8), (16,))
        entry_images = np.empty(offsets[-1], dtype=np.int32)
        entry_signatures = np.empty((offsets[-1],) + tuple(shape), dtype=dtype)
        cursor = offsets[:-1].copy()
        for words, images, signatures in chunks:
            scatter_entries(words, images, signatures, cursor, entry_images, entry_signatures)
        self._arrays = self._weights(offsets, entry_images, entry_signatures)
        self._pending = []
        return self._arrays

    def _weights(self, offsets, entry_images, entry_signatures):
        n_images = len(self._ids)
        counts = np.diff(offsets)
        weights = np.ones(len(counts))
        if self.idf:
            held = counts > 0
            weights[held] = np.log(n_images / counts[held]) ** 2
        entry_words = np.repeat(np.arange(len(counts)), counts)
        norms = np.bincount(entry_images, weights=weights[entry_words], minlength=n_images)
        scales = np.zeros(n_images)
        np.divide(1.0, np.sqrt(norms), out=scales, where=norms > 0)
        return {"word_offsets": offsets, "entry_images": entry_images, "entry_signatures": entry_signatures,
                "image_scales": scales, "word_weights": weights}

    # -- searching -------------------------------------------------------------------

    def search(self, query_sets, k=10):
        """The ``k`` indexed images most similar to each query.

        Parameters
        ----------
        query_sets : list of WordSignatures (from :meth:`ASMKEncoder.transform_queries`)
        k : int, default=10

        Returns
        -------
        scores : (n, min(k, len(self))) float32 ndarray, decreasing along each row
        ids : list of n lists of str; ties in order of insertion. A query sharing no word
            with the index (or with no descriptors) scores 0 everywhere.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        alpha, threshold = self._check_params()
        queries = list(query_sets)
        for index, item in enumerate(queries):
            self._check_set(item, f"query {index}")
        n, k = len(queries), min(int(k), len(self))
        if n == 0 or k == 0:
            return np.zeros((n, k), dtype=np.float32), [[] for _ in range(n)]
        arrays = self._layout()
        q_offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(q) for q in queries], out=q_offsets[1:])
        q_words = np.concatenate([np.asarray(q.words, dtype=np.int64) for q in queries])
        q_signatures = np.concatenate([q.signatures for q in queries])
        scores = np.empty((n, k))
        images = np.empty((n, k), dtype=np.int64)
        entries = arrays["entry_signatures"]
        table = selectivity_table(self._n_bits(), alpha, threshold)
        if self.binary and entries.shape[1] % 8 == 0:  # 64 bits at a time
            entries, q_signatures = entries.view(np.uint64), np.ascontiguousarray(q_signatures).view(np.uint64)
        score_queries(q_offsets, q_words, q_signatures, arrays["word_offsets"], arrays["entry_images"], entries,
                      arrays["word_weights"], arrays["image_scales"], table, alpha, threshold, scores, images)
        return scores.astype(np.float32), [[self._ids[j] for j in row] for row in images.tolist()]

    def _n_bits(self):
        """B of the binary similarity 1 - 2 h / B: the signature's bits (8 a byte; the
        reference's 128 for SIFT's 128 dimensions)."""
        dtype, shape = self._signature
        return float(shape[0] * 8) if dtype == np.uint8 else 1.0

    def _check_params(self):
        alpha, threshold = self.alpha, self.threshold
        if not isinstance(alpha, (int, float, np.number)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not isinstance(threshold, (int, float, np.number)) or isinstance(threshold, bool) or not -1 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
        if self.idf not in (True, False):
            raise ValueError(f"idf must be True or False, got {self.idf!r}")
        return float(alpha), float(threshold)

    # -- files -----------------------------------------------------------------------

    def _metadata(self):
        dtype, shape = self._signature
        arrays = self._arrays
        return {"format": ASMK_FORMAT, "format_version": ASMK_FORMAT_VERSION, "vladkit_version": __version__,
                "params": {"alpha": float(self.alpha), "threshold": float(self.threshold), "idf": bool(self.idf)},
                "n_images": len(self), "n_words": len(arrays["word_offsets"]) - 1,
                "n_entries": int(arrays["word_offsets"][-1]), "signature_dtype": np.dtype(dtype).name,
                "signature_shape": list(shape)}

    def save(self, folder, extra_files=None):
        """Write the index to ``folder``, atomically (a temporary sibling folder renamed
        into place; an index folder already there is replaced, anything else refused).

        ``extra_files``: ``{name: bytes}`` kept in the folder too (the command line's recipe
        and vocabulary)."""
        if self._signature is None:
            raise ValueError("nothing to save: add images first")
        self._check_params()
        arrays = self._layout()
        extra_files = dict(extra_files or {})
        # Either kind of index folder may be replaced by this one, nothing else.
        with index_folder_writer(folder, (INDEX_FORMAT, ASMK_FORMAT), set(_INDEX_FILES) | set(ASMK_FILES)) as temporary:
            for key in ARRAYS:
                with open(os.path.join(temporary, f"{key}.npy"), "wb") as handle:
                    np.save(handle, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
            _write_file(os.path.join(temporary, IDS_FILE), _json_bytes(self._ids))
            for extra, data in sorted(extra_files.items()):
                _write_file(os.path.join(temporary, extra), bytes(data))
            metadata = self._metadata()
            if extra_files:
                metadata["extra_files"] = sorted(extra_files)
            _write_file(os.path.join(temporary, METADATA_FILE), _json_bytes(metadata))  # last: complete

    @classmethod
    def load(cls, folder, *, mmap=True):
        """Read an index written by :meth:`save`; its arrays memory-mapped (``mmap=True``)
        or read into memory. Anything inconsistent is refused with :class:`IndexFileError`
        naming the file."""
        folder = os.fspath(folder)
        metadata = _read_json(folder, METADATA_FILE)
        if not isinstance(metadata, dict) or metadata.get("format") != ASMK_FORMAT:
            raise IndexFileError(f"{folder!r}: {METADATA_FILE} does not describe a vladkit ASMK index")
        if metadata.get("format_version") != ASMK_FORMAT_VERSION:
            raise IndexFileError(f"{folder!r}: ASMK index format version {metadata.get('format_version')!r}; "
                                 f"this vladkit reads version {ASMK_FORMAT_VERSION}")
        try:
            params = metadata["params"]
            index = cls(alpha=float(params["alpha"]), threshold=float(params["threshold"]), idf=bool(params["idf"]))
            n_images, n_words, n_entries = (int(metadata[key]) for key in ("n_images", "n_words", "n_entries"))
            signature = (np.dtype(metadata["signature_dtype"]), tuple(int(v) for v in metadata["signature_shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFileError(f"{folder!r}: {METADATA_FILE} is incomplete or malformed ({exc})") from None
        ids = _read_json(folder, IDS_FILE)
        if not isinstance(ids, list) or len(ids) != n_images or not all(isinstance(i, str) for i in ids):
            raise IndexFileError(f"{folder!r}: {IDS_FILE} does not hold the {n_images} image ids of {METADATA_FILE}")
        expected = {"word_offsets": (n_words + 1,), "entry_images": (n_entries,),
                    "entry_signatures": (n_entries,) + signature[1], "image_scales": (n_images,),
                    "word_weights": (n_words,)}
        arrays = {}
        for key, (dtype, _) in ARRAYS.items():
            path = os.path.join(folder, f"{key}.npy")
            try:
                array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise IndexFileError(f"{path}: unreadable ({exc})") from None
            want = signature[0] if dtype is None else np.dtype(dtype)
            if array.dtype != want or array.shape != expected[key]:
                raise IndexFileError(f"{path}: {array.dtype} of shape {array.shape}, expected {want} of shape "
                                     f"{expected[key]} ({METADATA_FILE}); the folder is damaged or mixed")
            arrays[key] = array
        offsets = arrays["word_offsets"]
        if len(offsets) and (offsets[0] != 0 or offsets[-1] != n_entries or np.any(np.diff(offsets) < 0)):
            raise IndexFileError(f"{os.path.join(folder, 'word_offsets.npy')}: not the offsets of {n_entries} entries")
        if n_entries and (int(arrays["entry_images"].min()) < 0 or int(arrays["entry_images"].max()) >= n_images):
            raise IndexFileError(f"{os.path.join(folder, 'entry_images.npy')}: image numbers outside 0..{n_images - 1}")
        index._ids, index._id_set = ids, set(ids)
        index._signature, index._arrays = signature, arrays
        return index
