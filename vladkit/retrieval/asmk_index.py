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
place; loaded memory-mapped, so a large index costs page cache, not resident memory. The
ids too: their UTF-8 bytes end to end (``ids.npy``) and where each starts
(``id_offsets.npy``), decoded only for the results a search returns.

A folder of a million images or more is written without holding the index in memory by
:func:`vladkit.retrieval.asmk_build.build_asmk_index`, to the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so no temporary folder is ever taken for stale
    fcntl = None

from .._version import __version__
from ..kernels.asmk import count_words, scatter_entries, score_queries, score_scratch, selectivity_table

# Not imported here: ..encoders.asmk and .index_files, which load scikit-learn and faiss
# (about 100 MB resident together) for the other index kind and the encoder. A process that
# loads an ASMK index and searches it with word sets it was given needs neither; both are
# imported on first use (_word_signatures_class, _index_files).

__all__ = ["ASMKIndex", "StoredIds"]

ASMK_FORMAT = "vladkit-asmk-index"
# 2: ids as UTF-8 bytes and offsets (ids.npy, id_offsets.npy) rather than ids.json.
ASMK_FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"  # as index_files.METADATA_FILE: the file that marks a folder complete
#: name -> (dtype, dimensions) of the arrays of a saved index.
ARRAYS = {
    "word_offsets": ("int64", 1),
    "entry_images": ("int32", 1),
    "entry_signatures": (None, 2),
    "image_scales": ("float64", 1),
    "word_weights": ("float64", 1),
}
#: name -> dtype of the two arrays that hold the ids.
ID_ARRAYS = {"ids": "uint8", "id_offsets": "int64"}
ASMK_FILES = (METADATA_FILE, *(f"{name}.npy" for name in (*ID_ARRAYS, *ARRAYS)))
#: How ids are encoded: UTF-8, lone surrogates (file names that are not UTF-8, as
#: os.fsdecode gives them) kept as their 3-byte forms, so every str round-trips.
ID_ENCODING, ID_ERRORS = "utf-8", "surrogatepass"


def _index_files():
    """:mod:`.index_files`, imported on first use (it loads faiss and scikit-learn)."""
    from . import index_files
    return index_files


def _refuse(message):
    """Raise :class:`~vladkit.retrieval.index_files.IndexFileError` with ``message``."""
    raise _index_files().IndexFileError(message)


def _word_signatures_class():
    from ..encoders.asmk import WordSignatures
    return WordSignatures


def encode_ids(ids):
    """``(data, offsets)``: the ids' encoded bytes end to end (uint8) and where each
    starts, with the end last (int64, len(ids) + 1)."""
    encoded = [i.encode(ID_ENCODING, ID_ERRORS) for i in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


class StoredIds(Sequence):
    """Image ids by position: those of a saved index decoded from their bytes on demand
    (``data[offsets[i]:offsets[i + 1]]``, memory-mapped), then those added since.

    ``in`` builds a set of every id the first time it is used (only :meth:`ASMKIndex.add`
    needs it), so loading and searching a large index never holds its ids as objects.
    """

    def __init__(self, data=None, offsets=None, source=None):
        self._data = np.zeros(0, dtype=np.uint8) if data is None else data
        self._offsets = np.zeros(1, dtype=np.int64) if offsets is None else offsets
        self._source = source     # the file named when a stored id cannot be decoded
        self._added = []
        self._set = None

    def __len__(self):
        return len(self._offsets) - 1 + len(self._added)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        position = int(position)
        stored = len(self._offsets) - 1
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"id position {position} out of range for {len(self)} ids")
        if position >= stored:
            return self._added[position - stored]
        first, end = int(self._offsets[position]), int(self._offsets[position + 1])
        try:
            return self._data[first:end].tobytes().decode(ID_ENCODING, ID_ERRORS)
        except UnicodeDecodeError as exc:
            _refuse(f"{self._source}: id {position} is not UTF-8 ({exc}); the file is damaged")

    def __iter__(self):
        for position in range(len(self)):
            yield self[position]

    def __contains__(self, value):
        if self._set is None:
            self._set = set(self)
        return value in self._set

    def extend(self, ids):
        self._added.extend(ids)
        if self._set is not None:
            self._set.update(ids)

    def arrays(self):
        """``(data, offsets)`` of every id, to save."""
        if not self._added:
            return self._data, self._offsets
        data, offsets = encode_ids(self._added)
        return (np.concatenate([self._data, data]),
                np.concatenate([self._offsets[:-1], offsets + self._offsets[-1]]))


class _ScratchPool:
    """Score scratches (:func:`~vladkit.kernels.asmk.score_scratch`) kept between
    searches: allocating and zeroing 21 bytes per image for each query costs more than
    scoring a small one. Each search takes its own, so threads may search at once; a new
    pool with each layout (the scratch holds the images' gammas)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free = []

    def take(self, blocks, image_scales):
        with self._lock:
            for k, scratch in enumerate(self._free):
                if len(scratch[0]) == blocks:
                    return self._free.pop(k)
        return score_scratch(blocks, image_scales)

    def give(self, scratch):
        with self._lock:
            self._free = self._free[-3:] + [scratch]


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
        self._ids = StoredIds()
        self._scratch = _ScratchPool()
        self._pending = []          # (words, images, signatures) chunks not yet laid out
        self._source = None         # the folder a loaded index was read from (named in errors)
        self._arrays = None         # the laid-out inverted file (dict of ARRAYS)
        self._signature = None      # (dtype, shape) of one signature

    def __len__(self):
        return len(self._ids)

    @property
    def ids(self):
        """The ids by position (a read-only sequence: those of a loaded index are decoded
        when read)."""
        return self._ids

    @property
    def binary(self):
        return self._signature is not None and self._signature[0] == np.uint8

    @property
    def bytes_per_image(self):
        """The inverted file's size over the number of images: per entry its image number
        (4 bytes) and signature (16 bytes for 128-bit ASMK*), plus the image's normaliser
        (8 bytes); the word offsets and weights, shared, are left out."""
        if not len(self) or self._signature is None:
            return 0.0
        dtype, shape = self._signature
        entries = int(self._layout()["word_offsets"][-1])
        return (entries * (4 + np.dtype(dtype).itemsize * int(np.prod(shape)))) / len(self) + 8

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
        duplicates = [i for i in ids if i in self._ids or (i in seen or seen.add(i))]
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
        return self

    def _check_set(self, item, where):
        if not isinstance(item, _word_signatures_class()):
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
        self._scratch = _ScratchPool()  # the gammas changed
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
        # One query in this thread; more in parallel blocks, one per numba thread.
        threads = _numba_threads()
        blocks = 1 if n == 1 else max(1, min(n, threads))
        scratch = self._scratch.take(blocks, arrays["image_scales"])
        try:
            damaged = score_queries(q_offsets, q_words, q_signatures, arrays["word_offsets"], arrays["entry_images"],
                                    entries, arrays["word_weights"], arrays["image_scales"], table, alpha, threshold,
                                    scores, images, scratch, threads)
        finally:
            self._scratch.give(scratch)  # left zeroed by the kernel, even for a damaged list
        if damaged >= 0:
            _refuse(f"{self._source or 'the index'}: entry_images.npy: the inverted list of word {damaged} holds "
                    f"image numbers out of 0..{len(self) - 1} or not increasing; the folder is damaged")
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
        offsets = self._arrays["word_offsets"]
        return index_metadata(self, len(self), len(offsets) - 1, int(offsets[-1]), self._signature)

    def save(self, folder, extra_files=None):
        """Write the index to ``folder``, atomically (a temporary sibling folder renamed
        into place; an index folder already there is replaced, anything else refused).

        ``extra_files``: ``{name: bytes}`` kept in the folder too (the command line's recipe
        and vocabulary)."""
        if self._signature is None:
            raise ValueError("nothing to save: add images first")
        self._check_params()
        arrays = dict(self._layout())
        arrays["ids"], arrays["id_offsets"] = self._ids.arrays()
        with index_writer(folder) as temporary:
            for key in (*ID_ARRAYS, *ARRAYS):
                with open(os.path.join(temporary, f"{key}.npy"), "wb") as handle:
                    np.save(handle, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
            write_metadata(temporary, self._metadata(), extra_files)

    @classmethod
    def load(cls, folder, *, mmap=True):
        """Read an index written by :meth:`save` (or
        :func:`~vladkit.retrieval.asmk_build.build_asmk_index`); its arrays memory-mapped
        (``mmap=True``) or read into memory. Anything inconsistent is refused with
        :class:`~vladkit.retrieval.index_files.IndexFileError` naming the file.

        Loading reads only the small arrays (per word, per image); the entries' image
        numbers are checked as a search reads their lists."""
        folder = os.fspath(folder)
        metadata = _read_metadata(folder)
        try:
            params = metadata["params"]
            index = cls(alpha=float(params["alpha"]), threshold=float(params["threshold"]), idf=bool(params["idf"]))
            n_images, n_words, n_entries = (int(metadata[key]) for key in ("n_images", "n_words", "n_entries"))
            signature = (np.dtype(metadata["signature_dtype"]), tuple(int(v) for v in metadata["signature_shape"]))
        except (KeyError, TypeError, ValueError) as exc:
            _refuse(f"{folder!r}: {METADATA_FILE} is incomplete or malformed ({exc})")
        if signature[0] not in (np.uint8, np.float32) or len(signature[1]) != 1 or min(n_images, n_words,
                                                                                       n_entries) < 0:
            _refuse(f"{folder!r}: {METADATA_FILE} describes no ASMK index this vladkit reads")
        expected = {"word_offsets": (n_words + 1,), "entry_images": (n_entries,),
                    "entry_signatures": (n_entries,) + signature[1], "image_scales": (n_images,),
                    "word_weights": (n_words,), "id_offsets": (n_images + 1,)}
        arrays = {}
        for key, dtype in [*((key, dtype) for key, (dtype, _) in ARRAYS.items()), *ID_ARRAYS.items()]:
            arrays[key] = _load_array(folder, key, signature[0] if dtype is None else np.dtype(dtype),
                                      expected.get(key), mmap)
        _check_offsets(folder, "word_offsets", arrays["word_offsets"], n_entries)
        _check_offsets(folder, "id_offsets", arrays["id_offsets"], len(arrays["ids"]))
        for key in ("image_scales", "word_weights"):
            if not np.all(np.isfinite(arrays[key])) or np.any(arrays[key] < 0):
                _refuse(f"{os.path.join(folder, key + '.npy')}: values that are not finite and non-negative")
        index._ids = StoredIds(arrays.pop("ids"), arrays.pop("id_offsets"), os.path.join(folder, "ids.npy"))
        index._signature, index._arrays, index._source = signature, arrays, folder
        return index


def index_metadata(params, n_images, n_words, n_entries, signature):
    """The ``metadata.json`` of an index: ``params`` an :class:`ASMKIndex` (its alpha,
    threshold and idf), the sizes, and ``signature`` (dtype, shape)."""
    dtype, shape = signature
    return {"format": ASMK_FORMAT, "format_version": ASMK_FORMAT_VERSION, "vladkit_version": __version__,
            "params": {"alpha": float(params.alpha), "threshold": float(params.threshold), "idf": bool(params.idf)},
            "n_images": int(n_images), "n_words": int(n_words), "n_entries": int(n_entries),
            "signature_dtype": np.dtype(dtype).name, "signature_shape": [int(v) for v in shape]}


def _numba_threads():
    import numba  # loaded already, by the kernels
    return numba.get_num_threads()


def _read_metadata(folder):
    path = os.path.join(folder, METADATA_FILE)
    try:
        with open(path, "rb") as handle:
            metadata = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        _refuse(f"{folder!r} is not a vladkit index folder: {METADATA_FILE} is missing")
    except (UnicodeDecodeError, ValueError) as exc:
        _refuse(f"{folder!r}: {METADATA_FILE} is not valid UTF-8 JSON ({exc})")
    if not isinstance(metadata, dict) or metadata.get("format") != ASMK_FORMAT:
        _refuse(f"{folder!r}: {METADATA_FILE} does not describe a vladkit ASMK index")
    if metadata.get("format_version") != ASMK_FORMAT_VERSION:
        _refuse(f"{folder!r}: ASMK index format version {metadata.get('format_version')!r}; "
                f"this vladkit reads version {ASMK_FORMAT_VERSION}")
    return metadata


def _load_array(folder, key, dtype, shape, mmap):
    """``key.npy``, refused unless of ``dtype`` and ``shape`` (any 1-D length if None)."""
    path = os.path.join(folder, f"{key}.npy")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:  # missing, truncated (numpy checks the size), not .npy
        _refuse(f"{path}: unreadable ({exc})")
    if array.dtype != dtype or (array.shape != shape if shape is not None else array.ndim != 1):
        _refuse(f"{path}: {array.dtype} of shape {array.shape}, expected {dtype} of shape "
                f"{shape if shape is not None else '(n,)'} ({METADATA_FILE}); the folder is damaged or mixed")
    return array


def _check_offsets(folder, key, offsets, total):
    """Offsets of a CSR layout: from 0 to ``total``, never decreasing (read in blocks, so
    a million offsets need no large temporary)."""
    ok = len(offsets) > 0 and offsets[0] == 0 and offsets[-1] == total
    step = 1 << 20
    for first in range(0, len(offsets) - 1, step) if ok else ():
        block = np.asarray(offsets[first:first + step + 1])
        if np.any(block[1:] < block[:-1]):
            ok = False
            break
    if not ok:
        _refuse(f"{os.path.join(folder, key + '.npy')}: not the offsets of {total} entries; the file is damaged")


# -- writing folders -----------------------------------------------------------------


def write_metadata(temporary, metadata, extra_files=None):
    """The extra files (``{name: bytes or path of a file}``; a path is moved in, so that
    large files, the re-ranking features, are not held in memory), then
    ``metadata.json``: last, it marks the folder complete."""
    files = _index_files()
    extra_files = dict(extra_files or {})
    for extra, data in sorted(extra_files.items()):
        if isinstance(data, (str, os.PathLike)):
            shutil.move(os.fspath(data), os.path.join(temporary, extra))
        else:
            files._write_file(os.path.join(temporary, extra), bytes(data))
    if extra_files:
        metadata = {**metadata, "extra_files": sorted(extra_files)}
    files._write_file(os.path.join(temporary, METADATA_FILE), files._json_bytes(metadata))


def _temporary_pattern(name):
    """Names of the temporary siblings that index_folder_writer makes for ``name``
    (tempfile.mkdtemp's: prefix, 8 random characters, suffix)."""
    return re.compile(re.escape(f".{name}.") + r"[a-z0-9_]{8}\.tmp")


def lock_folder(path):
    """An open descriptor of folder ``path`` holding its exclusive ``flock``, or None when
    another process holds it (or without flock). The lock lasts until the descriptor is
    closed or the process dies (SIGKILL included): the kernel releases it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(folder):
    """Remove the temporary siblings of ``folder`` that a killed writer left (a folder
    whose writer is alive holds its lock, :func:`index_writer`, and is kept). Returns the
    paths removed."""
    target = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(target)
    pattern, removed = _temporary_pattern(name), []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
        path = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        fd = lock_folder(path)
        if fd is None:
            continue
        try:
            shutil.rmtree(path)   # under the lock: no writer can take it meanwhile
            removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextmanager
def index_writer(folder):
    """``with index_writer(folder) as temporary:`` index_folder_writer for an ASMK folder
    (either kind of index folder may be replaced, nothing else), after removing stale
    temporary siblings of earlier writers that were killed. The temporary folder is
    locked (``flock``) until it is renamed into place or removed, so that a concurrent
    writer's cleanup leaves it alone."""
    files = _index_files()
    remove_stale_temporaries(folder)
    locks = []
    try:
        with files.index_folder_writer(folder, (files.INDEX_FORMAT, ASMK_FORMAT),
                                       set(files._INDEX_FILES) | set(ASMK_FILES)) as temporary:
            locks.append(lock_folder(temporary))
            yield temporary
    finally:  # after the rename: the lock covers the folder until it is in place
        for fd in locks:
            if fd is not None:
                os.close(fd)
