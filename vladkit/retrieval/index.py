"""Image-vector search: a faiss index of inner products, saved as a folder.

:class:`VectorIndex` stores one vector per image under a string id (e.g. its path) and
returns, for each query, the ids with the largest inner products; the vectors are
L2-normalised, so the inner product is the cosine similarity. It is exact (``"flat"``)
or compressed by product quantization (``"pq"``, ``"ivfpq"``), on faiss, optionally
after a :class:`~vladkit.retrieval.whitening.PCAWhitening` (re-exported here).

An index is saved as a folder (metadata.json, index.faiss, ids.json, whitening.npz),
written into a temporary sibling folder and renamed into place, so a reader never sees a
half-written index; the files' names, format and helpers are in
:mod:`vladkit.retrieval.index_files` (:class:`IndexFileError` is re-exported here).
"""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np

from .._util.blas import load_faiss

# faiss's bundled OpenBLAS runs its generic kernel on CPUs newer than itself: import it
# with the kernel this CPU supports (unless OPENBLAS_CORETYPE is set or faiss is already
# loaded), numpy's OpenBLAS having detected its own first.
load_faiss()
import faiss  # noqa: E402
from sklearn.utils.validation import check_is_fitted

from .._version import __version__
from .._util.io import write_npz_atomically
from ..vocabulary.fileformat import _jsonable
from .index_files import (_INDEX_FILES, _WHITENING_ARRAYS, FAISS_FILE, IDS_FILE, INDEX_FORMAT, INDEX_FORMAT_VERSION,
                          METADATA_FILE, WHITENING_FILE, IndexFileError, _check_faiss_index, _json_bytes,
                          _load_whitening, _read_json, _write_file, index_folder_writer)
from .whitening import PCAWhitening

__all__ = ["IndexFileError", "PCAWhitening", "VectorIndex"]

KINDS = ("flat", "pq", "ivfpq")

#: Vectors are compared by float32 inner products: norms beyond 1e18 could overflow them.
_MAX_SQUARED_NORM = 1e36


# ------------------------------------------------------------------------ validation


def _as_matrix(X, name, dtype=np.float32):
    """X as a C-contiguous (n, D) array of finite numbers in ``dtype``, or a clear error."""
    X = np.asarray(X)
    if X.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of numbers, got dtype {X.dtype}")
    if X.ndim != 2:
        hint = " (one vector: use X.reshape(1, -1))" if X.ndim == 1 else ""
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {X.shape}{hint}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
        X = np.ascontiguousarray(X, dtype=dtype)
    finite = np.isfinite(X)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first in row {row}; float64 values beyond "
                         "float32's range overflow to inf)")
    return X


def _check_dim(X, expected, name, what):
    if X.shape[1] != expected:
        raise ValueError(f"{name} has dimension {X.shape[1]}, but {what} expects dimension {expected}")



# ------------------------------------------------------------------------- the index


def _parse_pq(pq):
    """'MxB' -> (M, B): M sub-quantizers of B bits."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", pq) if isinstance(pq, str) else None
    if match is None:
        raise ValueError(f"pq must be a string 'MxB' (M sub-quantizers of B bits each, e.g. '16x8'), got {pq!r}")
    m, bits = int(match.group(1)), int(match.group(2))
    if m < 1 or not 1 <= bits <= 16:
        raise ValueError(f"pq={pq!r}: need M >= 1 sub-quantizers and 1 <= B <= 16 bits, got M={m}, B={bits}")
    return m, bits


def _check_int_or_none(value, name):
    if value is None:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if name == 'nlist' else ''}, got {value!r}")


def _as_ids(ids, n_rows):
    """ids as a list of str (os.PathLike converted), one per row."""
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be a list of strings (one per vector), not a single string")
    try:
        ids = list(ids)
    except TypeError:
        raise TypeError(f"ids must be a list of strings, got {type(ids).__name__}") from None
    if len(ids) != n_rows:
        raise ValueError(f"got {n_rows} vectors but {len(ids)} ids: give one id per vector")
    out = []
    for position, value in enumerate(ids):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"ids[{position}] is {value!r} ({type(value).__name__}); ids must be strings "
                            "(e.g. image paths)")
        out.append(value)
    return out


class VectorIndex:
    """Nearest-neighbour search over image vectors by inner product, on faiss.

    Vectors are stored under string ids (e.g. image paths). They are meant to be
    L2-normalised (vladkit's encoders and :class:`PCAWhitening` output unit vectors), so
    the inner product is the cosine similarity; the index itself does not normalise.

    Parameters
    ----------
    kind : {"flat", "pq", "ivfpq"}, default="flat"
        "flat": exact search (faiss ``IndexFlatIP``), ``4 * dim`` bytes per vector.
        "pq": product quantization with asymmetric distance computation (faiss
        ``IndexPQ``, inner-product metric): each vector is cut into M sub-vectors, each
        replaced by the nearest of ``2**B`` centroids learnt by k-means, so a vector costs
        ``M * B / 8`` bytes; queries are not quantized, the score is the inner product
        of the query with the vector's reconstruction. The scan is still exhaustive.
        "ivfpq": an inverted file (faiss ``IndexIVFPQ`` over an ``IndexFlatIP`` coarse
        quantizer with ``nlist`` lists, spherical k-means) whose lists hold PQ codes of
        the residuals; a query scans only the ``nprobe`` lists whose centroids have the
        largest inner products with it.
    pq : str, default="16x8"
        "MxB" for "pq" and "ivfpq": M sub-quantizers of B bits (1 to 16). M must divide
        the dimension. Training needs at least ``2**B`` vectors; faiss recommends about
        ``39 * 2**B`` for good codebooks (9,984 for B = 8).
    nlist : int or None, default=None
        Inverted lists for "ivfpq"; None: ``round(4 * sqrt(n))`` for ``n`` training
        vectors (at least 1, at most ``n``).
    nprobe : int, default=8
        Lists scanned per query by "ivfpq" (capped at ``nlist``). A query whose lists
        hold fewer than ``k`` vectors is searched again with twice as many lists, until
        it has ``k`` results.
    whitening : PCAWhitening or None, default=None
        A fitted :class:`PCAWhitening` applied to every vector given to ``train``, ``add``
        and ``search``; it is saved with the index.

    Attributes
    ----------
    dim : int or None
        Dimension of the vectors ``add`` and ``search`` take (None until known).
    index_dim : int or None
        Dimension of the stored vectors (after whitening).
    bytes_per_vector : int or None
        ``4 * index_dim`` for "flat"; the PQ code size ``ceil(M * B / 8)`` otherwise
        (an "ivfpq" list also stores an 8-byte label per vector).
    ids : list of str
        The ids, in insertion order.
    faiss_index : faiss.Index or None
        The underlying faiss index (None before training).

    Notes
    -----
    Results are deterministic: scores in decreasing order, exact ties broken by insertion
    order (the earlier vector first), including ties at the k-th place. ``search``
    returns ``min(k, len(index))`` columns and never faiss's -1 placeholder.
    """

    def __init__(self, kind="flat", *, pq="16x8", nlist=None, nprobe=8, whitening=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self._pq = _parse_pq(pq)
        _check_int_or_none(nlist, "nlist")
        _check_int_or_none(nprobe, "nprobe")
        if nprobe is None:
            raise ValueError("nprobe must be a positive integer, got None")
        if whitening is not None:
            if not isinstance(whitening, PCAWhitening):
                raise TypeError(f"whitening must be a fitted PCAWhitening or None, got {type(whitening).__name__}")
            check_is_fitted(whitening, "projection_")
        self.kind = kind
        self.pq = pq
        self.nlist = nlist
        self.nprobe = nprobe
        self.whitening = whitening
        self._index = None
        self._has_direct_map = False
        self._ids = []
        self._id_set = set()
        self._dim = whitening.n_features_in_ if whitening is not None else None
        if kind == "flat" and whitening is not None:
            self._index = faiss.IndexFlatIP(whitening.n_components_)

    # -- properties -------------------------------------------------------------------

    def __len__(self):
        return 0 if self._index is None else int(self._index.ntotal)

    def __repr__(self):
        extra = "" if self.kind == "flat" else f", pq={self.pq!r}"
        if self.kind == "ivfpq":
            extra += f", nlist={self.nlist_!r}, nprobe={self.nprobe}"
        return (f"VectorIndex(kind={self.kind!r}{extra}, dim={self.dim}, n={len(self)}"
                f"{', whitening' if self.whitening is not None else ''})")

    @property
    def dim(self):
        return self._dim

    @property
    def index_dim(self):
        if self.whitening is not None:
            return self.whitening.n_components_
        return self._dim

    @property
    def is_trained(self):
        """True when vectors can be added: always for "flat", after ``train`` otherwise."""
        return self.kind == "flat" or self._index is not None

    @property
    def nlist_(self):
        """The number of inverted lists of a trained "ivfpq" index (else None)."""
        if self.kind != "ivfpq" or self._index is None:
            return None
        return int(self._index.nlist)

    @property
    def bytes_per_vector(self):
        if self.kind == "flat":
            return None if self.index_dim is None else 4 * self.index_dim
        m, bits = self._pq
        return (m * bits + 7) // 8

    @property
    def ids(self):
        return list(self._ids)

    @property
    def faiss_index(self):
        return self._index

    # -- building ----------------------------------------------------------------------

    def _prepare(self, X, name, *, fix_dim=False):
        """Validate X, check (or, with fix_dim, set when unknown) its dimension, whiten."""
        X = _as_matrix(X, name)
        if self._dim is None:
            if not fix_dim:
                return X
        else:
            _check_dim(X, self._dim, name, "this index")
        if self.whitening is not None:
            return self.whitening._transform(X)  # unit rows
        if len(X) and np.einsum("ij,ij->i", X, X, dtype=np.float64).max() > _MAX_SQUARED_NORM:
            raise ValueError(
                f"{name} has vectors of norm above {_MAX_SQUARED_NORM ** 0.5:.0e}: their float32 "
                "inner products would overflow; L2-normalise them (or index with a whitening)"
            )
        return X

    def _require_trained(self, action):
        if not self.is_trained:
            raise ValueError(f"this {self.kind!r} index is not trained: call train(X) with "
                             f"representative vectors before {action}")

    def train(self, X):
        """Learn the quantizers ("pq", "ivfpq") from representative vectors.

        For "flat" only the input is checked (and fixes the dimension). An index can be
        trained again only while it holds no vectors.

        Parameters
        ----------
        X : (n, dim) array
            At least ``2**B`` vectors (and ``nlist`` for "ivfpq").

        Returns
        -------
        self
        """
        X = self._prepare(X, "X", fix_dim=True)
        dim = self._dim if self._dim is not None else X.shape[1]
        d = X.shape[1]
        if self.kind == "flat":
            if self._index is None:
                self._dim, self._index = dim, faiss.IndexFlatIP(d)
            return self
        if len(self):
            raise ValueError(f"this index already holds {len(self)} vectors; training again would "
                             "invalidate their codes: create a new VectorIndex")
        m, bits = self._pq
        if d % m:
            raise ValueError(f"pq={self.pq!r}: the dimension {d} of the indexed vectors is not a "
                             f"multiple of M={m} sub-quantizers; choose M dividing {d}")
        n, needed = len(X), 2 ** bits
        if n < needed:
            raise ValueError(f"pq={self.pq!r} needs at least 2**{bits} = {needed} training vectors "
                             f"(one per centroid of each sub-quantizer), got {n}")
        if self.kind == "pq":
            index = faiss.IndexPQ(d, m, bits, faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = self.nlist if self.nlist is not None else min(n, max(1, round(4 * math.sqrt(n))))
            if nlist > n:
                raise ValueError(f"nlist={nlist} inverted lists need at least {nlist} training vectors, got {n}")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, int(nlist), m, bits,
                                     faiss.METRIC_INNER_PRODUCT)
            # faiss only prints a warning below 39 points per centroid; the docstring says it.
            index.cp.min_points_per_centroid = 1
        index.pq.cp.min_points_per_centroid = 1
        index.train(X)
        self._dim, self._index = dim, index
        return self

    def add(self, X, ids):
        """Add vectors under string ids.

        Parameters
        ----------
        X : (n, dim) array
        ids : sequence of n str (or path-like, stored as str)
            Unique: an id already in the index, or repeated in ``ids``, is refused.

        Returns
        -------
        self
        """
        self._require_trained("adding vectors")
        X = self._prepare(X, "X", fix_dim=True)
        ids = _as_ids(ids, len(X))
        seen = set()
        duplicates = [i for i in ids if i in self._id_set or (i in seen or seen.add(i))]
        if duplicates:
            shown = ", ".join(repr(i) for i in duplicates[:3])
            raise ValueError(f"duplicate ids ({len(duplicates)}, e.g. {shown}): each id must be "
                             "unique in the index")
        if self._index is None:  # flat, first vectors
            self._dim, self._index = X.shape[1], faiss.IndexFlatIP(X.shape[1])
        if len(X):
            self._index.add(X)
        self._ids.extend(ids)
        self._id_set.update(ids)
        return self

    # -- searching ---------------------------------------------------------------------

    def search(self, X, k=10, *, expand=0, alpha=0.0):
        """The ``k`` indexed vectors with the largest inner products with each query.

        Parameters
        ----------
        X : (n, dim) array
            Queries (whitened like the indexed vectors when the index has whitening).
        k : int, default=10
        expand : int, default=0
            Query expansion: search first for the ``expand`` nearest vectors x_1..x_m of
            each query q (in the index's space: whitened, and as stored, i.e. decoded for
            "pq"/"ivfpq"), then search again with

                q' = (q + sum_i w_i x_i) / ||q + sum_i w_i x_i||,   w_i = max(s_i, 0)^alpha

            where s_i = q.x_i. ``alpha=0``: average query expansion (Chum et al. ICCV
            2007: all weights 1); ``alpha>0``: alpha-QE (Radenovic et al. TPAMI 2018;
            they use alpha = 3), which lets weak neighbours count less. Helps when the
            nearest results are right (a near-duplicate's other views); can drift
            otherwise.
        alpha : float, default=0.0

        Returns
        -------
        scores : (n, min(k, len(self))) float32 ndarray
            Inner products (approximate for "pq" / "ivfpq"), decreasing along each row.
        ids : list of n lists of str
            The matching ids; exact ties in order of insertion.
        """
        _check_int_or_none(k, "k")
        if k is None:
            raise ValueError("k must be a positive integer, got None")
        self._require_trained("searching")
        Q = self._prepare(X, "queries")
        if self.nprobe is None or isinstance(self.nprobe, bool) or int(self.nprobe) < 1:
            raise ValueError(f"nprobe must be a positive integer, got {self.nprobe!r}")
        n, k = len(Q), min(int(k), len(self))
        if n == 0 or k == 0:
            return np.zeros((n, k), dtype=np.float32), [[] for _ in range(n)]
        if not isinstance(expand, (int, np.integer)) or isinstance(expand, bool) or expand < 0:
            raise ValueError(f"expand must be a non-negative integer, got {expand!r}")
        if not (isinstance(alpha, (int, float, np.floating)) and not isinstance(alpha, bool) and 0 <= alpha < math.inf):
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        if expand:
            Q = self._expand(Q, min(int(expand), len(self)), float(alpha))
        scores, labels = self._search(Q, k)
        ids = self._ids
        return scores, [[ids[j] for j in row] for row in labels.tolist()]

    def _expand(self, Q, m, alpha):
        """The expanded queries of :meth:`search` (``expand=m``), unit rows, float32."""
        scores, labels = self._search(Q, m)
        if self.kind == "ivfpq" and not self._has_direct_map:
            self._index.make_direct_map()  # reconstruction by id in an inverted file
            self._has_direct_map = True
        stored = self._index.reconstruct_batch(labels.ravel()).reshape(len(Q), m, -1)
        weights = np.ones_like(scores) if alpha == 0 else np.maximum(scores, 0) ** alpha
        expanded = Q.astype(np.float64) + np.einsum("qm,qmd->qd", weights.astype(np.float64), stored)
        norms = np.linalg.norm(expanded, axis=1, keepdims=True)
        return (expanded / np.maximum(norms, 1e-12)).astype(np.float32)

    def _faiss_search(self, Q, kk, nprobe):
        if self.kind == "ivfpq":
            return self._index.search(Q, kk, params=faiss.SearchParametersIVF(nprobe=nprobe))
        return self._index.search(Q, kk)

    def _search(self, Q, k):
        """Top k (1 <= k <= ntotal) with deterministic ties and no missing results.

        Asks faiss for one more result than needed: if the (k+1)-th score equals the k-th,
        tied vectors may have been cut arbitrarily, so the query is searched again with
        twice as many results until the tie is complete; then the results are ordered by
        (score descending, insertion order). An "ivfpq" query with fewer than k vectors in
        its lists is searched again with twice the lists. Each query is processed on its
        own terms, so its results do not depend on the other queries of the batch.
        """
        ntotal = len(self)
        nlist = self.nlist_ or 1
        scores = np.empty((len(Q), k), dtype=np.float32)
        labels = np.empty((len(Q), k), dtype=np.int64)
        pending = {(min(k + 1, ntotal), min(int(self.nprobe), nlist)): np.arange(len(Q))}
        while pending:
            (kk, nprobe), rows = pending.popitem()
            D, I = self._faiss_search(Q[rows], kk, nprobe)
            complete = I[:, k - 1] >= 0
            exhausted = (kk >= ntotal) | (I[:, kk - 1] < 0)
            resolved = complete & (exhausted | (D[:, kk - 1] < D[:, k - 1]))
            if resolved.any():
                d, i = D[resolved], I[resolved]
                d = np.where(i >= 0, d, -np.inf)
                i = np.where(i >= 0, i, np.iinfo(np.int64).max)
                order = np.lexsort((i, -d), axis=-1)[:, :k]
                scores[rows[resolved]] = np.take_along_axis(d, order, axis=1)
                labels[rows[resolved]] = np.take_along_axis(i, order, axis=1)
            incomplete = ~complete
            if incomplete.any():
                if nprobe >= nlist:  # every list was scanned: cannot happen, all vectors are in lists
                    raise RuntimeError(f"faiss returned fewer than {k} results from {ntotal} vectors")
                key = (kk, min(2 * nprobe, nlist))
                pending[key] = np.concatenate([pending.get(key, rows[:0]), rows[incomplete]])
            tied = complete & ~resolved
            if tied.any():
                key = (min(2 * kk, ntotal), nprobe)
                pending[key] = np.concatenate([pending.get(key, rows[:0]), rows[tied]])
        return scores, labels

    # -- files -------------------------------------------------------------------------

    def _metadata(self):
        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "dim": int(self._dim),
            "index_dim": int(self.index_dim),
            "pq": self.pq,
            "nlist": self.nlist_,
            "nprobe": int(self.nprobe),
            "ntotal": len(self),
            "params": {"nlist": None if self.nlist is None else int(self.nlist)},
            "whitening": None if self.whitening is None else _jsonable(self.whitening.get_params()),
            "vladkit_version": __version__,
        }

    def save(self, folder, extra_files=None):
        """Write the index to ``folder``, atomically.

        Everything is written into a temporary sibling folder, which is then renamed to
        ``folder``. An existing index folder there is replaced (it is renamed aside first
        and deleted once the new one is in place; if the rename fails, it is put back).
        Anything else at ``folder`` (a file, a folder with other contents) is refused.

        Parameters
        ----------
        folder : str or path-like
        extra_files : dict or None
            More files to keep in the folder, ``{name: bytes or path of a file}`` (e.g. the
            command line's recipe and vocabulary; a path is moved in, so large files are
            not held in memory), written with the rest, inside the same atomic step; their
            names are recorded in the metadata, so a rebuild may replace them.
        """
        extra_files = dict(extra_files or {})
        for extra in extra_files:
            if extra in _INDEX_FILES or os.path.basename(extra) != extra or extra.startswith("."):
                raise ValueError(f"extra_files: {extra!r} is not a plain file name of its own")
        if self._index is None:
            raise ValueError("nothing to save: this index has no dimension yet (train or add vectors first)"
                             if self.kind == "flat" else
                             f"this {self.kind!r} index is not trained: train it before saving")
        with index_folder_writer(folder) as temporary:
            _write_file(os.path.join(temporary, FAISS_FILE),
                        faiss.serialize_index(self._index).tobytes())
            _write_file(os.path.join(temporary, IDS_FILE), _json_bytes(self._ids))
            if self.whitening is not None:
                write_npz_atomically(os.path.join(temporary, WHITENING_FILE),
                                      {key: getattr(self.whitening, key) for key in _WHITENING_ARRAYS})
            for extra, data in sorted(extra_files.items()):
                if isinstance(data, (str, os.PathLike)):
                    shutil.move(os.fspath(data), os.path.join(temporary, extra))
                else:
                    _write_file(os.path.join(temporary, extra), bytes(data))
            # metadata last: a folder with metadata.json is complete.
            metadata = self._metadata()
            if extra_files:
                metadata["extra_files"] = sorted(extra_files)
            _write_file(os.path.join(temporary, METADATA_FILE), _json_bytes(metadata))

    @classmethod
    def load(cls, folder):
        """Read an index written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            ``folder`` does not exist.
        IndexFileError
            ``folder`` is not a vladkit index (missing or unreadable files), has another
            format version, or is inconsistent (ids vs. vectors, dimensions, kind).

        Notes
        -----
        faiss parses ``index.faiss`` in C++: load folders from sources you trust.
        """
        folder = os.fspath(folder)
        if not os.path.exists(folder):
            raise FileNotFoundError(f"no index folder at {folder!r}")
        if not os.path.isdir(folder):
            raise IndexFileError(f"{folder!r} is not a vladkit index folder (it is not a folder)")
        metadata = _read_json(folder, METADATA_FILE)
        if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT:
            raise IndexFileError(f"{folder!r} is not a vladkit index folder ({METADATA_FILE} has format "
                                 f"{metadata.get('format') if isinstance(metadata, dict) else None!r})")
        version = metadata.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise IndexFileError(
                f"{folder!r} has index format version {version!r}; this vladkit ({__version__}) reads "
                f"version {INDEX_FORMAT_VERSION} (rebuild the index, or use the vladkit version that "
                f"wrote it: {metadata.get('vladkit_version')!r})"
            )
        try:
            kind, dim, index_dim = metadata["kind"], metadata["dim"], metadata["index_dim"]
            pq, nlist, nprobe = metadata["pq"], metadata["nlist"], metadata["nprobe"]
            whitening_params = metadata["whitening"]
        except KeyError as exc:
            raise IndexFileError(f"{folder!r}: {METADATA_FILE} lacks the entry {exc.args[0]!r}") from None
        try:
            params = metadata.get("params")
            self = cls(kind, pq=pq, nlist=params.get("nlist") if isinstance(params, dict) else None,
                       nprobe=nprobe)
        except (TypeError, ValueError) as exc:
            raise IndexFileError(f"{folder!r}: bad parameters in {METADATA_FILE}: {exc}") from exc
        for key, value in (("dim", dim), ("index_dim", index_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise IndexFileError(f"{folder!r}: {METADATA_FILE} has {key}={value!r}, expected a positive integer")

        if whitening_params is not None:
            self.whitening = _load_whitening(folder, whitening_params, dim, index_dim)
        elif dim != index_dim:
            raise IndexFileError(f"{folder!r}: dim={dim} differs from index_dim={index_dim} without whitening")

        path = os.path.join(folder, FAISS_FILE)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise IndexFileError(f"{folder!r} is not a complete vladkit index: {FAISS_FILE} is missing") from None
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except Exception as exc:  # faiss raises RuntimeError on a bad file
            raise IndexFileError(f"{folder!r}: {FAISS_FILE} is not a readable faiss index ({exc})") from exc
        _check_faiss_index(folder, index, self, index_dim, nlist)

        ids = _read_json(folder, IDS_FILE)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise IndexFileError(f"{folder!r}: {IDS_FILE} must hold a JSON list of strings")
        if len(ids) != index.ntotal:
            raise IndexFileError(f"{folder!r} is inconsistent: {IDS_FILE} has {len(ids)} ids but "
                                 f"{FAISS_FILE} holds {index.ntotal} vectors")
        if len(set(ids)) != len(ids):
            raise IndexFileError(f"{folder!r}: {IDS_FILE} contains duplicate ids")
        self._dim, self._index = dim, index
        self._ids, self._id_set = ids, set(ids)
        return self
