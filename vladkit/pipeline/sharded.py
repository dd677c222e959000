"""Out-of-core encodings: a folder of numbered shards (``vladkit encode -o FOLDER``).

Layout::

    FOLDER/
      manifest.json      format and version; the job: recipe, settings, number of images
                         and the SHA-256 of images.jsonl; once complete, every shard's
                         input range, number of vectors and SHA-256
      images.jsonl       the input images in order, one JSON string per line
      shard-000000.npy   (rows, dim) float32: the vectors of the shard's readable images
      shard-000000.json  the shard's report: its input range, the ids of its rows, the
                         images it skipped (with the reason), the SHA-256 of its .npy and
                         the digest of the job that wrote it (``job_sha256``)
      ...
      .vladkit.lock      the job lock (:mod:`vladkit.pipeline.locking`): one job writes at a time

A shard covers ``shard_size`` consecutive input images. Its ``.npy`` and then its
``.json`` are written to temporary names and renamed (:func:`vladkit._util.io.atomic_output`):
a shard exists when its report does, a half-written shard never does, and a task that
runs twice (a Dask worker that died after writing, say) writes the same bytes again.
``manifest.json`` says ``"complete": true`` only when every shard is in place; readers
(:class:`ShardedEncodings`) accept only complete folders, and check each shard's SHA-256
against the manifest the first time they read it (in the same pass as the read). A shard
belongs to one job: its report names the job's digest (recipe, settings and the input
order, :func:`job_digest`), so a rerun adopts only its own job's shards. Nothing here
needs all vectors in memory: readers read the shards one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .._version import __version__
from .._util.io import atomic_output, json_dumps
from .locking import LOCK_FILE
from .recipe import EncodingsFileError, Recipe, file_sha256

__all__ = ["ShardedEncodings", "SHARDED_FORMAT"]

SHARDED_FORMAT = "vladkit-encodings-sharded"
SHARDED_FORMAT_VERSION = 1
MANIFEST, IMAGES = "manifest.json", "images.jsonl"


def sample_rows(n_rows, n, seed=0):
    """``min(n, n_rows)`` row numbers drawn without replacement, sorted, from ``seed``."""
    if n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n, replace=False))


def shard_stem(number):
    return f"shard-{number:06d}"


class _HashingWriter:
    """A file object that hashes what goes through it (np.save needs only ``write``)."""

    def __init__(self, handle):
        self._handle, self.digest = handle, hashlib.sha256()

    def write(self, data):
        self.digest.update(data)
        return self._handle.write(data)


def write_json(path, value):
    """Deterministic JSON (sorted keys, file names as :func:`vladkit._util.io.json_dumps`), atomically."""
    with atomic_output(path, "w") as handle:
        handle.write(json_dumps(value, sort_keys=True, indent=1) + "\n")


def read_json(path):
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def job_digest(job):
    """The SHA-256 of a job's description (recipe, settings, input order): what its shard
    reports carry, so that no job adopts another's shards."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def write_shard(folder, number, first, end, vectors, ids, skipped, job_sha256):
    """Write shard ``number`` (input images ``first:end``) of the job ``job_sha256``:
    vectors (or the word-set entries of :mod:`vladkit.pipeline.word_sets`, a structured
    array), then the report.

    Returns the report (what :func:`read_shard` gives back).
    """
    folder = Path(folder)
    word_sets = vectors.dtype.names is not None
    payload = np.ascontiguousarray(vectors) if word_sets else np.ascontiguousarray(vectors, dtype=np.float32)
    stem = shard_stem(number)
    with atomic_output(folder / f"{stem}.npy") as handle:
        hashing = _HashingWriter(handle)
        np.lib.format.write_array(hashing, payload, allow_pickle=False)
    report = {"number": number, "first": first, "end": end, "rows": len(ids),
              "dim": None if word_sets else payload.shape[1],
              "ids": [str(i) for i in ids], "skipped": [list(item) for item in skipped],
              "sha256": hashing.digest.hexdigest(), "job_sha256": job_sha256}
    if word_sets:
        report["entries"] = len(payload)
    elif len(payload) != len(ids):
        raise ValueError(f"{len(payload)} vectors for {len(ids)} ids")
    write_json(folder / f"{stem}.json", report)
    return report


def read_shard(folder, number, verify=True, job_sha256=None):
    """Shard ``number``'s report if the shard is complete and intact (its .npy present,
    of the recorded size, and with ``verify`` of the recorded SHA-256) and, given
    ``job_sha256``, written by that job; else None."""
    folder = Path(folder)
    report = read_json(folder / f"{shard_stem(number)}.json")
    if not isinstance(report, dict) or report.get("number") != number:
        return None
    if job_sha256 is not None and report.get("job_sha256") != job_sha256:
        return None
    path = folder / f"{shard_stem(number)}.npy"
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if "entries" in report:  # word-set entries (vladkit.pipeline.word_sets)
        if (vectors.ndim != 1 or vectors.dtype.names != ("word", "image", "signature")
                or len(vectors) != report["entries"] or len(report.get("ids", ())) != report.get("rows")):
            return None
    elif vectors.shape != (report.get("rows"), report.get("dim")) or vectors.dtype != np.float32:
        return None
    if verify and file_sha256(path) != report.get("sha256"):
        return None
    return report


def images_digest(images):
    """SHA-256 of the images.jsonl text for this list (the job's order)."""
    return hashlib.sha256(_images_text(images).encode("utf-8", "surrogateescape")).hexdigest()


def _images_text(images):
    return "".join(json_dumps(str(image)) + "\n" for image in images)


def write_images(folder, images):
    with atomic_output(Path(folder) / IMAGES, "w") as handle:
        handle.write(_images_text(images))


def write_manifest(folder, job, shards=None, dim=None, word_sets=None):
    """The manifest: the ``job`` (recipe, settings, images), and once ``shards`` (their
    reports, in order) are all written, ``complete`` with each shard's summary (and for
    word-set shards, ``word_sets``: the codebook size, the signature's dtype and shape,
    the role)."""
    manifest = {"format": SHARDED_FORMAT, "format_version": SHARDED_FORMAT_VERSION, "job": job,
                "complete": shards is not None, "vladkit_version": __version__}
    if shards is not None:
        manifest["dim"] = dim
        manifest["n_vectors"] = sum(report["rows"] for report in shards)
        manifest["shards"] = [{key: report[key] for key in ("number", "first", "end", "rows", "entries", "sha256")
                               if key in report} for report in shards]
        if word_sets is not None:
            manifest["word_sets"] = word_sets
            manifest["n_entries"] = sum(report["entries"] for report in shards)
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder):
    """The folder's manifest if it is a vladkit sharded-encodings manifest (its format
    name and a version this vladkit reads), else None."""
    manifest = read_json(Path(folder) / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT:
        return manifest
    return None


def is_job_file(name):
    """Whether ``name`` is one that a job writes in its folder: the manifest, the images
    list, the lock, a shard, or the temporary file of one of those (an interrupted write)."""
    return _JOB_FILE.fullmatch(name) is not None


_JOB_FILE = re.compile(r"(manifest\.json|images\.jsonl|shard-\d{6}\.(npy|json))"
                       r"|\.(manifest\.json|images\.jsonl|shard-\d{6}\.(npy|json))\.[A-Za-z0-9_]+\.tmp"
                       r"|" + re.escape(LOCK_FILE))


class _HashingReader:
    """A file object that hashes what is read through it (numpy's header parsing needs
    only ``read``)."""

    def __init__(self, handle):
        self._handle, self.digest = handle, hashlib.sha256()

    def read(self, size=-1):
        data = self._handle.read(size)
        self.digest.update(data)
        return data


def read_verified(path, sha256, chunk_bytes=1 << 22):
    """The array in the .npy file ``path``, read once, hashed as it is read.

    Raises
    ------
    EncodingsFileError
        Its SHA-256 is not ``sha256``, or it is not a readable .npy file (the message
        does not name the file: the caller says which shard of which folder it is).
    """
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        try:
            version = np.lib.format.read_magic(reader)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(reader)
        except ValueError as exc:
            raise EncodingsFileError(f"not a readable .npy file ({exc})") from None
        if dtype.hasobject:
            raise EncodingsFileError("it holds Python objects, not vectors")
        array = np.empty(shape[::-1] if fortran_order else shape, dtype=dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        filled = 0
        while filled < len(buffer):
            count = handle.readinto(buffer[filled:filled + chunk_bytes])
            if not count:
                break
            reader.digest.update(buffer[filled:filled + count])
            filled += count
        reader.read()  # anything after the array counts too
    if reader.digest.hexdigest() != sha256 or filled < len(buffer):
        raise EncodingsFileError("its SHA-256 is not the one its job recorded: the file was damaged or "
                                 "changed after it was written (encode again, or read it unchecked: "
                                 "verify=False, --no-verify)")
    return array.T if fortran_order else array


class ShardedEncodings:
    """A complete sharded encodings folder, read without loading all its vectors.

    The same attributes as :class:`vladkit.pipeline.encodings.EncodedImages` (``ids``, ``recipe``,
    ``skipped``; ``vectors`` loads them all, for small sets), plus block-wise access:
    :meth:`blocks` (shard by shard, memory-mapped), :meth:`take` (chosen rows) and
    :meth:`sample` (a reproducible sample of rows, for training whitening and quantizers).

    Parameters
    ----------
    folder : path
        Written by :func:`vladkit.pipeline.jobs.encode_images` (``vladkit encode -o FOLDER``).
    verify : bool, default=True
        Check each shard against the SHA-256 its job recorded, the first time it is read,
        in the same pass (the shard is read into memory, hashed as it comes); a damaged or
        changed shard raises :class:`vladkit.pipeline.recipe.EncodingsFileError` naming it.
        False: memory-map the shards, unchecked (the user accepts the risk).
    """

    def __init__(self, folder, verify=True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise EncodingsFileError(f"{os.fspath(folder)!r} is not a vladkit encodings folder (no {MANIFEST})")
        if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
            raise EncodingsFileError(f"{os.fspath(folder)!r} has sharded format version "
                                     f"{manifest.get('format_version')!r}; this vladkit reads "
                                     f"version {SHARDED_FORMAT_VERSION}")
        if not manifest.get("complete"):
            raise EncodingsFileError(f"{os.fspath(folder)!r} is an unfinished encoding job: rerun the "
                                     "same `vladkit encode` command to finish it")
        if ("word_sets" in manifest) != self._word_sets:
            raise EncodingsFileError(
                f"{os.fspath(folder)!r} holds word-signature sets (ASMK), not vectors: open it with "
                "load_encodings or ShardedWordSets" if self._word_sets is False else
                f"{os.fspath(folder)!r} holds vectors, not word-signature sets (encode with --encoder asmk)")
        self.manifest = manifest
        self.recipe = Recipe.from_json(manifest["job"]["recipe"])
        self.dim = None if self._word_sets else int(manifest["dim"])
        self._shards = manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self._shards])
        self.verify = verify
        self._verified = set()  # positions of the shards checked so far
        self.ids, self.skipped = [], []
        job_sha256 = job_digest(manifest["job"])
        for summary in self._shards:
            # The reports' own checks (present, shape, dtype); the SHA-256 comes with the first read.
            report = read_shard(self.folder, summary["number"], verify=False)
            if (report is None or report["sha256"] != summary["sha256"] or report["rows"] != summary["rows"]
                    or report.get("job_sha256", job_sha256) != job_sha256):
                raise EncodingsFileError(f"{os.fspath(folder)!r}: {shard_stem(summary['number'])} is missing "
                                         "or does not match the manifest")
            self.ids += report["ids"]
            self.skipped += [tuple(item) for item in report["skipped"]]

    #: whether the folder holds word-signature sets (vladkit.pipeline.word_sets) instead of vectors
    _word_sets = False

    def __len__(self):
        return int(self._starts[-1])

    def _check_block(self, summary, array):
        """Whether a shard's array has the shape and dtype its summary gives."""
        return array.shape == (summary["rows"], self.dim) and array.dtype == np.float32

    def __repr__(self):
        return f"ShardedEncodings({os.fspath(self.folder)!r}: {len(self)} x {self.dim}, {len(self._shards)} shards)"

    def _shard(self, position):
        summary = self._shards[position]
        path = self.folder / f"{shard_stem(summary['number'])}.npy"
        if self.verify and position not in self._verified:
            try:
                vectors = read_verified(path, summary["sha256"])
            except EncodingsFileError as exc:
                raise EncodingsFileError(f"{os.fspath(self.folder)!r}: {path.name}: {exc}") from None
            if not self._check_block(summary, vectors):
                raise EncodingsFileError(f"{os.fspath(self.folder)!r}: {shard_stem(summary['number'])} does "
                                         "not match the manifest")
            self._verified.add(position)
            return vectors
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def blocks(self):
        """Yield (first row, (rows, dim) float32 memory-mapped array), shard by shard."""
        for position in range(len(self._shards)):
            if self._shards[position]["rows"]:
                yield int(self._starts[position]), self._shard(position)

    @property
    def vectors(self):
        """All vectors in one (n, dim) array, in memory: for small sets; use
        :meth:`blocks` or :meth:`take` otherwise."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        for start, block in self.blocks():
            out[start:start + len(block)] = block
        return out

    def take(self, rows):
        """The vectors of the given rows (in that order), reading only their shards."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be in [0, {len(self)})")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        positions = np.searchsorted(self._starts, rows, side="right") - 1
        for position in np.unique(positions):
            mine = positions == position
            out[mine] = self._shard(position)[rows[mine] - self._starts[position]]
        return out

    def sample(self, n, seed=0):
        """``min(n, len(self))`` vectors drawn without replacement (reproducible from
        ``seed``, in row order), and their row numbers."""
        rows = sample_rows(len(self), n, seed)
        return self.take(rows), rows
