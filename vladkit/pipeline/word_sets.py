"""Word-signature sets on disk: ``vladkit encode --encoder asmk``'s output, the input of an
ASMK inverted file (:class:`vladkit.ASMKIndex`).

An image encoded for the selective match kernels is a *set* of (visual word, signature)
pairs (:class:`vladkit.encoders.asmk.WordSignatures`), of a length that varies from image
to image, not a vector. A sharded folder of them has the layout of vector encodings
(:mod:`vladkit.pipeline.sharded`: manifest, images list, lock, shard reports with their
SHA-256 and job digest, atomic writes, resumable jobs); only each shard's ``.npy`` differs:

    shard-NNNNNN.npy   (entries,) structured array of fields
                         word       int32   the visual word
                         image      int32   the image's row in the shard (its id's position)
                         signature  uint8 (ceil(D/8),) sign bits, or float32 (D,) unit vector
                       sorted by (word, image)

Sorted by word, a shard's entries of a range of words are one contiguous slice: the
inverted file is built from the shards range by range within a memory budget, reading
each shard's slice once (:func:`vladkit.retrieval.asmk_build.build_asmk_index`). The
manifest records the codebook size, the signature's dtype and shape, and whether the sets
were encoded as database images (``multiple_assignment`` words per descriptor) or as queries
(``query_assignment``).
"""

from __future__ import annotations

import os

import numpy as np

from ..encoders._base import CHUNK_ROWS
from ..encoders.asmk import ASMKEncoder, WordSignatures
from .recipe import EncodingsFileError
from .sharded import ShardedEncodings

__all__ = ["QueryEncoding", "ShardedWordSets", "WordSetAccumulation", "entry_dtype", "is_word_set_encoder",
           "pack_entries", "unpack_entries", "word_set_accumulation"]

#: The roles of a word-set folder: as indexed images or as queries (multiple assignment m).
ROLES = ("database", "queries")
#: The recipe's encoder kinds that give word-signature sets.
WORD_SET_ENCODERS = frozenset({"asmk"})


class QueryEncoding:
    """An ASMK encoder that the streamed pipeline runs as a query encoder
    (:meth:`~vladkit.ASMKEncoder.transform_queries`: ``query_assignment`` words per
    descriptor); every attribute is the encoder's."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __getattr__(self, name):
        return getattr(self.encoder, name)


def is_word_set_encoder(encoder):
    """Whether ``encoder`` gives word-signature sets (ASMK) rather than vectors."""
    return isinstance(encoder, (ASMKEncoder, QueryEncoding))


def word_set_accumulation(encoder, n_images):
    """The :class:`WordSetAccumulation` of ``n_images`` images for a word-set encoder."""
    if isinstance(encoder, QueryEncoding):
        return WordSetAccumulation(encoder.encoder, n_images, queries=True)
    return WordSetAccumulation(encoder, n_images)


def word_set_memory(encoder):
    """``(fixed, per_image)`` bytes an ASMK encoder needs while encoding a batch (see
    :func:`vladkit.pipeline.budget.encoder_memory`): a group of ``CHUNK_ROWS`` rows as
    float32 and float64 copies, their faiss candidates and m assignments, and the m
    signatures and words of each row; an image's joined pieces and its set."""
    vocabulary = encoder.vocabulary_
    dim, m = vocabulary.descriptor_dim_, max(encoder.multiple_assignment, encoder.query_assignment)
    signature = int(np.prod(encoder.signature_shape_)) * (1 if encoder.binary else 4)
    fixed = CHUNK_ROWS * (12 * dim + 8 * (2 * m + 16) + m * (signature + 8 + 8 * dim))
    return fixed, 0


def entry_dtype(signature_dtype, signature_shape):
    """The structured dtype of a shard's entries (word, image, signature)."""
    return np.dtype([("word", "<i4"), ("image", "<i4"),
                     ("signature", np.dtype(signature_dtype), tuple(int(v) for v in signature_shape))])


def pack_entries(sets, signature_dtype, signature_shape):
    """The entries of ``sets`` (image ``i`` is ``sets[i]``), sorted by (word, image).

    Parameters
    ----------
    sets : list of WordSignatures
    signature_dtype, signature_shape : the encoder's signatures (``np.uint8``, ``(16,)``...)

    Returns
    -------
    (entries,) structured ndarray of :func:`entry_dtype`
    """
    counts = [len(s) for s in sets]
    entries = np.empty(sum(counts), dtype=entry_dtype(signature_dtype, signature_shape))
    if len(entries):
        entries["word"] = np.concatenate([s.words for s in sets])
        entries["image"] = np.repeat(np.arange(len(sets), dtype=np.int32), counts)
        entries["signature"] = np.concatenate([s.signatures for s in sets])
        # Stable on words: within a word the images stay in increasing order.
        entries = entries[np.argsort(entries["word"], kind="stable")]
    return entries


def unpack_entries(entries, n_images):
    """The inverse of :func:`pack_entries`: ``n_images`` WordSignatures (words increasing)."""
    order = np.lexsort((entries["word"], entries["image"]))
    ordered = entries[order]
    bounds = np.searchsorted(ordered["image"], np.arange(n_images + 1))
    words, signatures = ordered["word"].astype(np.int64), ordered["signature"]
    return [WordSignatures(words[a:b].copy(), np.ascontiguousarray(signatures[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:])]


class WordSetAccumulation:
    """The ``Accumulation`` of an ASMK encoder in the streamed pipeline
    (:func:`vladkit.pipeline.image_encoder.encode_batches`): images given whole or in pieces,
    encoded together at :meth:`finish`.

    Pieces of one image are joined before encoding: the per-word sums of ASMK run row after
    row as the reference's do, and the signs of a sum must not depend on where the image
    was cut. (The pieces of one image are what the budget already holds for it.)
    """

    def __init__(self, encoder, n_images, queries=False):
        self.encoder, self.queries = encoder, queries
        self.pieces = [[] for _ in range(n_images)]

    def add(self, position, piece):
        descriptors = piece.descriptors if hasattr(piece, "descriptors") else np.asarray(piece)
        self.pieces[position].append(descriptors)

    def finish(self):
        dim = self.encoder.vocabulary_.descriptor_dim_
        sets = [parts[0] if len(parts) == 1 else
                np.concatenate(parts) if parts else np.zeros((0, dim), np.float32) for parts in self.pieces]
        return (self.encoder.transform_queries if self.queries else self.encoder.transform)(sets)


class ShardedWordSets(ShardedEncodings):
    """A complete sharded folder of word-signature sets, read shard by shard.

    ``ids``, ``recipe``, ``skipped`` and ``manifest`` as :class:`ShardedEncodings`; plus
    ``n_images``, ``n_words`` (the codebook's size), ``signature_dtype``,
    ``signature_shape``, ``role`` ("database" or "queries") and:

    * :meth:`shards`: ``(first image, entries)`` per shard, entries memory-mapped (or read
      and checked against their SHA-256 with ``verify``): the source protocol of
      :func:`vladkit.retrieval.asmk_build.build_asmk_index`;
    * :meth:`word_sets`: the :class:`WordSignatures` of chosen images.
    """

    _word_sets = True

    def __init__(self, folder, verify=True):
        super().__init__(folder, verify=verify)
        layout = self.manifest.get("word_sets")
        try:
            self.n_words = int(layout["n_words"])
            self.signature_dtype = np.dtype(layout["signature_dtype"])
            self.signature_shape = tuple(int(v) for v in layout["signature_shape"])
            self.role = layout["role"]
        except (KeyError, TypeError, ValueError) as exc:
            raise EncodingsFileError(f"{os.fspath(folder)!r}: the manifest's word_sets entry is incomplete "
                                     f"({exc})") from None
        if self.role not in ROLES or self.signature_dtype not in (np.uint8, np.float32):
            raise EncodingsFileError(f"{os.fspath(folder)!r}: the manifest's word_sets entry is malformed")
        self.dtype = entry_dtype(self.signature_dtype, self.signature_shape)

    @property
    def n_images(self):
        return len(self)

    def __repr__(self):
        return (f"ShardedWordSets({os.fspath(self.folder)!r}: {len(self)} images, {self.n_words} words, "
                f"{len(self._shards)} shards)")

    def _check_block(self, summary, array):
        return array.shape == (summary["entries"],) and array.dtype == self.dtype

    def shards(self):
        """Yield ``(first image, (entries,) structured array)`` per shard, in image order."""
        for position, summary in enumerate(self._shards):
            yield int(self._starts[position]), self._shard(position)

    def blocks(self):
        raise TypeError(f"{os.fspath(self.folder)!r} holds word-signature sets (ASMK), not vectors: build an "
                        "ASMK index from it ('vladkit index build')")

    vectors = property(blocks)

    def take(self, rows):
        raise TypeError(f"{os.fspath(self.folder)!r} holds word-signature sets (ASMK), not vectors: "
                        "use word_sets(rows)")

    def sample(self, n, seed=0):
        raise TypeError(f"{os.fspath(self.folder)!r} holds word-signature sets (ASMK), not vectors")

    def word_sets(self, rows=None):
        """The WordSignatures of the given rows (default: all), in that order."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be in [0, {len(self)})")
        out = [None] * len(rows)
        positions = np.searchsorted(self._starts, rows, side="right") - 1
        for position in np.unique(positions):
            start = int(self._starts[position])
            sets = unpack_entries(np.asarray(self._shard(position)), self._shards[position]["rows"])
            for i in np.flatnonzero(positions == position):
                out[i] = sets[rows[i] - start]
        return out
