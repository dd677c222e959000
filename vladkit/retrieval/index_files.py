"""The files of a saved :class:`~vladkit.retrieval.index.VectorIndex`: names, format, reading and writing.

An index is saved as a folder::

    folder/
        metadata.json    format and version, kind, dimensions, parameters, vladkit version
        index.faiss      the faiss index (faiss.write_index's format; faiss.read_index reads it)
        ids.json         the ids, a JSON list of strings, in insertion order
        whitening.npz    the PCAWhitening arrays (only with whitening; plain arrays, no pickle)

written into a temporary sibling folder and renamed into place, so a reader never sees a
half-written index. This module holds the file names and format constants,
:class:`IndexFileError`, and the helpers that write files durably, move the folder into
place, and read and check each file when loading.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np

from .._util.blas import load_faiss

# faiss's bundled OpenBLAS runs its generic kernel on CPUs newer than itself: import it
# with the kernel this CPU supports (unless OPENBLAS_CORETYPE is set or faiss is already
# loaded), numpy's OpenBLAS having detected its own first.
load_faiss()
import faiss  # noqa: E402

from .._util.io import default_folder_mode, json_dumps
from .whitening import PCAWhitening

__all__ = ["IndexFileError"]

INDEX_FORMAT = "vladkit-index"
INDEX_FORMAT_VERSION = 1

METADATA_FILE = "metadata.json"
FAISS_FILE = "index.faiss"
IDS_FILE = "ids.json"
WHITENING_FILE = "whitening.npz"
_INDEX_FILES = (METADATA_FILE, FAISS_FILE, IDS_FILE, WHITENING_FILE)

#: Arrays of a fitted PCAWhitening, as saved with an index.
_WHITENING_ARRAYS = ("mean_", "components_", "explained_variance_", "explained_variance_ratio_",
                     "projection_")


class IndexFileError(ValueError):
    """A folder is not a vladkit index that this version can load (the message says why)."""


def _fsync_directory(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _json_bytes(value):
    """Pretty, sorted JSON in UTF-8 (file names that are not UTF-8 as escapes, see
    :func:`vladkit._util.io.json_dumps`)."""
    return (json_dumps(value, sort_keys=True, indent=1) + "\n").encode("utf-8")


def _read_json(folder, name):
    path = os.path.join(folder, name)
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise IndexFileError(f"{folder!r} is not a vladkit index folder: {name} is missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexFileError(f"{folder!r}: {name} is not valid UTF-8 JSON ({exc})") from exc


# --------------------------------------------------------------- folder helpers


def _check_replaceable(target, formats=(INDEX_FORMAT,), known_files=_INDEX_FILES):
    """Refuse to replace anything but an index folder (or an empty folder): one whose
    metadata names one of ``formats`` and that holds only ``known_files`` and the extra
    files its metadata lists."""
    if os.path.islink(target) or not os.path.isdir(target):
        raise FileExistsError(f"cannot save the index to {target!r}: it exists and is not a folder "
                              "(or is a symbolic link); remove it or choose another name")
    entries = os.listdir(target)
    if not entries:
        return
    try:
        with open(os.path.join(target, METADATA_FILE), "rb") as handle:
            metadata = json.loads(handle.read().decode("utf-8"))
        is_index = metadata.get("format") in formats
        extras = [str(name) for name in metadata.get("extra_files", [])] if is_index else []
    except (OSError, ValueError, AttributeError, TypeError):
        is_index, extras = False, []
    unexpected = sorted(set(entries) - set(known_files) - set(extras))
    if unexpected or not is_index:
        reason = f"it contains {unexpected[:3]}" if unexpected else f"it has no vladkit {METADATA_FILE}"
        raise FileExistsError(f"refusing to replace {target!r}: it is not a vladkit index folder "
                              f"({reason}); remove it or choose another name")


@contextmanager
def index_folder_writer(folder, formats=(INDEX_FORMAT,), known_files=_INDEX_FILES):
    """Write an index folder atomically: the block fills the temporary sibling folder it is
    given (``metadata.json`` last, which marks a folder complete); then that folder
    replaces ``folder`` (nothing, or an index folder of ``formats`` holding only
    ``known_files``: anything else is refused before anything is written), or, on any
    error, Ctrl-C included, is removed."""
    target = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot save the index to {target!r}: the folder {parent!r} does not exist")
    if os.path.lexists(target):
        _check_replaceable(target, formats, known_files)
    temporary = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        yield temporary
        os.chmod(temporary, default_folder_mode())  # mkdtemp's is 0o700
        _fsync_directory(temporary)
        _move_into_place(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(parent)


def _move_into_place(temporary, target):
    if not os.path.lexists(target):
        os.rename(temporary, target)
        return
    backup = temporary + ".old"
    os.rename(target, backup)
    try:
        os.rename(temporary, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _load_whitening(folder, params, dim, index_dim):
    path = os.path.join(folder, WHITENING_FILE)
    if not isinstance(params, dict):
        raise IndexFileError(f"{folder!r}: bad whitening parameters in {METADATA_FILE}")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise IndexFileError(f"{folder!r} is not a complete vladkit index: {WHITENING_FILE} is missing") from None
    except Exception as exc:
        raise IndexFileError(f"{folder!r}: {WHITENING_FILE} is not a readable .npz archive ({exc})") from exc
    arrays = {}
    with archive:
        for key in _WHITENING_ARRAYS:
            try:
                arrays[key] = archive[key]
            except KeyError:
                raise IndexFileError(f"{folder!r}: {WHITENING_FILE} lacks the array {key!r}") from None
            except ValueError as exc:  # object arrays need pickle: refused
                raise IndexFileError(f"{folder!r}: {WHITENING_FILE} entry {key!r} cannot be read "
                                     f"without pickle ({exc})") from exc
    expected = {"mean_": (dim,), "components_": (index_dim, dim), "explained_variance_": (index_dim,),
                "explained_variance_ratio_": (index_dim,), "projection_": (index_dim, dim)}
    for key, shape in expected.items():
        array = arrays[key]
        if array.shape != shape or array.dtype.kind != "f" or not np.all(np.isfinite(array)):
            raise IndexFileError(f"{folder!r}: {WHITENING_FILE} {key} has shape {array.shape} and dtype "
                                 f"{array.dtype}, expected {shape} finite floats")
    whitening = PCAWhitening()
    try:
        whitening.set_params(**{k: v for k, v in params.items() if k in whitening.get_params()})
        whitening._validate_params()
    except ValueError as exc:
        raise IndexFileError(f"{folder!r}: bad whitening parameters in {METADATA_FILE}: {exc}") from exc
    whitening.mean_ = np.ascontiguousarray(arrays["mean_"], dtype=np.float32)
    whitening.components_ = np.ascontiguousarray(arrays["components_"], dtype=np.float32)
    whitening.explained_variance_ = arrays["explained_variance_"].astype(np.float64)
    whitening.explained_variance_ratio_ = arrays["explained_variance_ratio_"].astype(np.float64)
    whitening.projection_ = np.ascontiguousarray(arrays["projection_"], dtype=np.float32)
    whitening.n_components_ = int(index_dim)
    whitening.n_features_in_ = int(dim)
    return whitening


def _check_faiss_index(folder, index, owner, index_dim, nlist):
    expected = {"flat": faiss.IndexFlatIP, "pq": faiss.IndexPQ, "ivfpq": faiss.IndexIVFPQ}[owner.kind]
    problem = None
    if not isinstance(index, expected):
        problem = f"a {type(index).__name__}, expected {expected.__name__} for kind {owner.kind!r}"
    elif index.metric_type != faiss.METRIC_INNER_PRODUCT:
        problem = "an index with another metric than the inner product"
    elif index.d != index_dim:
        problem = f"an index of dimension {index.d}, expected {index_dim}"
    elif not index.is_trained:
        problem = "an untrained index"
    elif owner.kind != "flat":
        m, bits = owner._pq
        if (index.pq.M, index.pq.nbits) != (m, bits):
            problem = f"PQ codes {index.pq.M}x{index.pq.nbits}, expected pq={owner.pq!r}"
        elif owner.kind == "ivfpq" and index.nlist != nlist:
            problem = f"{index.nlist} inverted lists, expected nlist={nlist!r}"
    if problem:
        raise IndexFileError(f"{folder!r} is inconsistent: {FAISS_FILE} holds {problem}")
