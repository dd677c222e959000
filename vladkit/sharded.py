"""Out-of-core encodings: a folder of numbered shards (``vladkit encode -o FOLDER``).

Layout::

    FOLDER/
      manifest.json      format and version; the job: recipe, settings, number of images
                         and the SHA-256 of images.jsonl; once complete, every shard's
                         input range, number of vectors and SHA-256
      images.jsonl       the input images in order, one JSON string per line
      shard-000000.npy   (rows, dim) float32: the vectors of the shard's readable images
      shard-000000.json  the shard's report: its input range, the ids of its rows, the
                         images it skipped (with the reason) and the SHA-256 of its .npy
      ...

A shard covers ``shard_size`` consecutive input images. Its ``.npy`` and then its
``.json`` are written to temporary names and renamed (:func:`vladkit._io.atomic_output`):
a shard exists when its report does, a half-written shard never does, and a task that
runs twice (a Dask worker that died after writing, say) writes the same bytes again.
``manifest.json`` says ``"complete": true`` only when every shard is in place; readers
(:class:`ShardedEncodings`) accept only complete folders. Nothing here needs all vectors
in memory: readers memory-map the shards, one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import __version__
from ._io import atomic_output, json_dumps
from .encodings import EncodingsFileError, Recipe, file_sha256, sample_rows

__all__ = ["ShardedEncodings", "SHARDED_FORMAT"]

SHARDED_FORMAT = "vladkit-encodings-sharded"
SHARDED_FORMAT_VERSION = 1
MANIFEST, IMAGES = "manifest.json", "images.jsonl"


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
    """Deterministic JSON (sorted keys, file names as :func:`vladkit._io.json_dumps`), atomically."""
    with atomic_output(path, "w") as handle:
        handle.write(json_dumps(value, sort_keys=True, indent=1) + "\n")


def read_json(path):
    """The JSON in ``path``, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_shard(folder, number, first, end, vectors, ids, skipped):
    """Write shard ``number`` (input images ``first:end``): vectors, then the report.

    Returns the report (what :func:`read_shard` gives back).
    """
    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    stem = shard_stem(number)
    with atomic_output(folder / f"{stem}.npy") as handle:
        hashing = _HashingWriter(handle)
        np.lib.format.write_array(hashing, vectors, allow_pickle=False)
    report = {"number": number, "first": first, "end": end, "rows": len(vectors), "dim": vectors.shape[1],
              "ids": [str(i) for i in ids], "skipped": [list(item) for item in skipped],
              "sha256": hashing.digest.hexdigest()}
    write_json(folder / f"{stem}.json", report)
    return report


def read_shard(folder, number, verify=True):
    """Shard ``number``'s report if the shard is complete and intact (its .npy present,
    of the recorded size, and with ``verify`` of the recorded SHA-256), else None."""
    folder = Path(folder)
    report = read_json(folder / f"{shard_stem(number)}.json")
    if not isinstance(report, dict) or report.get("number") != number:
        return None
    path = folder / f"{shard_stem(number)}.npy"
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if vectors.shape != (report.get("rows"), report.get("dim")) or vectors.dtype != np.float32:
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


def write_manifest(folder, job, shards=None, dim=None):
    """The manifest: the ``job`` (recipe, settings, images), and once ``shards`` (their
    reports, in order) are all written, ``complete`` with each shard's summary."""
    manifest = {"format": SHARDED_FORMAT, "format_version": SHARDED_FORMAT_VERSION, "job": job,
                "complete": shards is not None, "vladkit_version": __version__}
    if shards is not None:
        manifest["dim"] = dim
        manifest["n_vectors"] = sum(report["rows"] for report in shards)
        manifest["shards"] = [{key: report[key] for key in ("number", "first", "end", "rows", "sha256")}
                              for report in shards]
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder):
    manifest = read_json(Path(folder) / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT:
        return manifest
    return None


class ShardedEncodings:
    """A complete sharded encodings folder, read without loading all its vectors.

    The same attributes as :class:`vladkit.encodings.EncodedImages` (``ids``, ``recipe``,
    ``skipped``; ``vectors`` loads them all, for small sets), plus block-wise access:
    :meth:`blocks` (shard by shard, memory-mapped), :meth:`take` (chosen rows) and
    :meth:`sample` (a reproducible sample of rows, for training whitening and quantizers).

    Parameters
    ----------
    folder : path
        Written by :func:`vladkit.jobs.encode_images` (``vladkit encode -o FOLDER``).
    verify : bool, default=False
        Check every shard's SHA-256 (reads all the vectors once).
    """

    def __init__(self, folder, verify=False):
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
        self.manifest = manifest
        self.recipe = Recipe.from_json(manifest["job"]["recipe"])
        self.dim = int(manifest["dim"])
        self._shards = manifest["shards"]
        self._starts = np.cumsum([0] + [s["rows"] for s in self._shards])
        self.ids, self.skipped = [], []
        for summary in self._shards:
            report = read_shard(self.folder, summary["number"], verify=verify)
            if report is None or report["sha256"] != summary["sha256"] or report["rows"] != summary["rows"]:
                raise EncodingsFileError(f"{os.fspath(folder)!r}: {shard_stem(summary['number'])} is missing "
                                         "or does not match the manifest")
            self.ids += report["ids"]
            self.skipped += [tuple(item) for item in report["skipped"]]

    def __len__(self):
        return int(self._starts[-1])

    def __repr__(self):
        return f"ShardedEncodings({os.fspath(self.folder)!r}: {len(self)} x {self.dim}, {len(self._shards)} shards)"

    def _shard(self, position):
        number = self._shards[position]["number"]
        return np.load(self.folder / f"{shard_stem(number)}.npy", mmap_mode="r", allow_pickle=False)

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
