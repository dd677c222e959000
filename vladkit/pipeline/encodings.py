"""Encoded image sets on disk (``vladkit encode``'s output): one ``.npz`` file, or a
sharded folder (:mod:`vladkit.pipeline.sharded`).

An encodings file is an ``.npz`` archive (plain arrays, read with ``allow_pickle=False``):
``vectors`` (n, dim) float32, ``ids`` (n,) the image paths as strings, and a JSON
``metadata`` entry holding the *recipe* (:class:`vladkit.pipeline.recipe.Recipe`): the
local-feature extractor, the encoder and its parameters, the spatial pyramid if any, and
the vocabulary's path and SHA-256.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .._version import __version__
from .._util.io import write_npz_atomically
from .recipe import EncodingsFileError, Recipe
from .sharded import ShardedEncodings, read_manifest, sample_rows
from .word_sets import ShardedWordSets

__all__ = ["EncodedImages", "load_encodings"]

FILE_FORMAT = "vladkit-encodings"
FILE_FORMAT_VERSION = 1


@dataclass
class EncodedImages:
    """Vectors of images with their ids (paths) and the recipe that made them."""

    vectors: np.ndarray
    ids: list
    recipe: Recipe
    skipped: list = field(default_factory=list)   # [(path, reason), ...]

    def __len__(self):
        return len(self.vectors)

    @property
    def dim(self):
        return self.vectors.shape[1]

    def blocks(self):
        """Yield (first row, vectors): one block here (see ShardedEncodings.blocks)."""
        if len(self.vectors):
            yield 0, self.vectors

    def take(self, rows):
        """The vectors of the given rows, in that order."""
        return self.vectors[np.asarray(rows, dtype=np.int64).reshape(-1)]

    def sample(self, n, seed=0):
        """As :meth:`vladkit.pipeline.sharded.ShardedEncodings.sample` (the same rows for the same n,
        length and seed)."""
        rows = sample_rows(len(self), n, seed)
        return self.take(rows), rows

    def save(self, path):
        """Write atomically (temporary file + rename) and reproducibly."""
        metadata = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "recipe": self.recipe.to_json(),
            "skipped": [list(item) for item in self.skipped],
            "vladkit_version": __version__,
        }
        write_npz_atomically(path, {
            "vectors": np.ascontiguousarray(self.vectors, dtype=np.float32),
            "ids": np.array([str(i) for i in self.ids], dtype=str) if self.ids else np.zeros(0, "U1"),
            "metadata": np.array(json.dumps(metadata, sort_keys=True)),
        })


def load_encodings(path, verify=True):
    """Read ``vladkit encode``'s output: an ``.npz`` file (:meth:`EncodedImages.save`), or
    a sharded folder (:class:`vladkit.pipeline.sharded.ShardedEncodings`, read block by block;
    :class:`vladkit.pipeline.word_sets.ShardedWordSets` for the word sets of ``--encoder asmk``).

    ``verify``: check each shard of a folder against the SHA-256 its job recorded, as it
    is first read (False: read unchecked). An ``.npz`` is always checked: zip's CRC-32 of
    each array, as it is read."""
    name = os.fspath(path)
    if os.path.isdir(name):
        manifest = read_manifest(name)
        if manifest is not None and "word_sets" in manifest:
            return ShardedWordSets(name, verify=verify)
        return ShardedEncodings(name, verify=verify)
    try:
        archive = np.load(name, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise EncodingsFileError(f"{name!r} is not an encodings file (not a readable .npz: {exc})") from exc
    with archive:
        missing = {"vectors", "ids", "metadata"} - set(archive.files)
        if missing:
            raise EncodingsFileError(f"{name!r} is not a vladkit encodings file (missing {sorted(missing)})")
        try:
            vectors, ids, metadata = archive["vectors"], archive["ids"], json.loads(str(archive["metadata"]))
        except (ValueError, zipfile.BadZipFile) as exc:  # BadZipFile: an array failed its CRC-32
            raise EncodingsFileError(f"{name!r}: unreadable entry ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FILE_FORMAT:
        raise EncodingsFileError(f"{name!r} is not a vladkit encodings file")
    if metadata.get("format_version") != FILE_FORMAT_VERSION:
        raise EncodingsFileError(f"{name!r} has encodings format version {metadata.get('format_version')!r}; "
                                 f"this vladkit reads version {FILE_FORMAT_VERSION}")
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise EncodingsFileError(f"{name!r}: {len(ids)} ids for vectors of shape {vectors.shape}")
    try:
        recipe = Recipe.from_json(metadata.get("recipe", {}))
    except EncodingsFileError as exc:
        raise EncodingsFileError(f"{name!r}: {exc}") from None
    return EncodedImages(vectors, [str(i) for i in ids], recipe,
                         [tuple(item) for item in metadata.get("skipped", [])])
