"""An ASMK inverted file built from shards of entries without holding it in memory: the
folder :meth:`ASMKIndex.save <vladkit.retrieval.asmk_index.ASMKIndex.save>` writes, the
same bytes, for collections whose index outgrows the memory (a million images of ~300
words with 128-bit signatures: 6 GB).

The input is a *source* of entries (word, image, signature), in shards sorted by (word,
image) and coming in image order (:func:`build_asmk_index` lists what a source provides;
:class:`ShardSource` is one, over arrays or ``.npy`` files). The build reads it in passes:

1. count the entries of each word (and check every shard): the word offsets and weights;
2. the ids, streamed into ``ids.npy`` / ``id_offsets.npy``;
3. words in ranges whose entries fit the memory budget, one pass over the shards per
   range: in each shard a range's entries are one contiguous slice (the shard is sorted by
   word), scattered into the range's buffer at per-word cursors; shards come in image
   order, so each word's images stay increasing. The buffer is appended to
   ``entry_images.npy`` / ``entry_signatures.npy`` (their ``.npy`` header written first,
   for the final shape), and the image normalisers accumulated from it.

Peak memory is the budget (the buffer) plus ~24 bytes per image and 32 per word, not the
number of entries. Output is written with ``write``, never through a writable memory map:
a mapping's dirty pages would count as the process's resident memory.
"""

from __future__ import annotations

import io
import os
from itertools import islice

import numpy as np

from ..kernels.asmk import accumulate_norms, check_entries, count_words, scatter_range, word_slice
from ..pipeline.word_sets import entry_dtype
from .asmk_index import ASMKIndex, encode_ids, index_metadata, index_writer, write_metadata

__all__ = ["ShardSource", "build_asmk_index"]

#: Ids encoded and hashed this many at a time.
_ID_CHUNK = 1 << 16
#: Bytes of the budget kept for what is not counted: the allocator's slack, file buffers.
_SLACK = 32 << 20


class ShardSource:
    """A source for :func:`build_asmk_index` over a list of shards.

    Parameters
    ----------
    shards : list of (first_image, entries or path of a ``.npy`` file of entries)
        In image order; a file is memory-mapped each time it is read.
    ids : sequence of str, one per image
    n_words : int, the codebook's size
    signature_dtype, signature_shape : the signatures' (``np.uint8``, ``(16,)`` for 128 bits)
    """

    def __init__(self, shards, ids, n_words, signature_dtype=np.uint8, signature_shape=(16,)):
        self._shards = list(shards)
        self.ids = ids
        self.n_images = len(ids)
        self.n_words = int(n_words)
        self.signature_dtype = np.dtype(signature_dtype)
        self.signature_shape = tuple(signature_shape)

    def shards(self):
        for first, entries in self._shards:
            if isinstance(entries, (str, os.PathLike)):
                entries = np.load(entries, mmap_mode="r", allow_pickle=False)
            yield first, entries


def build_asmk_index(source, folder, *, alpha=3.0, threshold=0.0, idf=False, max_memory=2 * 2**30,
                     extra_files=None, progress=None):
    """Write the ASMK index of ``source``'s images to ``folder``: the files, byte for byte,
    of ``ASMKIndex(...).add(sets, ids).save(folder, extra_files)`` on the same images.

    Parameters
    ----------
    source : object with
        ``n_images`` (int); ``ids`` (sequence of n_images str, may be lazy); ``n_words``
        (int, the codebook's size); ``signature_dtype`` (``np.uint8`` or ``np.float32``);
        ``signature_shape`` (tuple, e.g. ``(16,)``); and ``shards()``, a fresh iterator of
        ``(first_image, entries)``: entries a 1-D array of
        :func:`vladkit.pipeline.word_sets.entry_dtype` (possibly
        memory-mapped), sorted by (word, image), ``image`` numbered within the shard
        (globally ``first_image + image``); shards in image order, the same on every call.
        An image with no words has no entries.
    folder : str or path
        Written atomically (a temporary sibling renamed into place; an index folder there
        is replaced, anything else refused); temporary siblings left by a killed build are
        removed first.
    alpha, threshold, idf : as :class:`~vladkit.retrieval.asmk_index.ASMKIndex`
    max_memory : int, default 2 GiB
        Bytes the build may hold besides what the process held before it: the range
        buffer gets what the per-image and per-word arrays leave.
    extra_files : dict of {name: bytes}, optional
    progress : callable(stage, done, total), optional
        Called as each shard is counted (stage ``"count"``) and each word range is written
        (``"write"``).

    Returns
    -------
    dict: ``n_images``, ``n_words``, ``n_entries``, ``passes`` (word ranges written) and
    ``buffer_bytes``.
    """
    params = ASMKIndex(alpha=alpha, threshold=threshold, idf=idf)
    params._check_params()
    layout = _Layout(source)
    counts, shard_sizes = _count(source, layout, progress)
    n_images = layout.n_images
    if n_images == 0:
        raise ValueError("nothing to save: the source has no images")
    counts = counts[:int(np.flatnonzero(counts)[-1]) + 1] if counts.any() else counts[:0]
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    weights = np.ones(len(counts))
    if idf:  # as ASMKIndex._weights
        held = counts > 0
        weights[held] = np.log(n_images / counts[held]) ** 2
    with index_writer(folder) as temporary:
        _write_ids(source.ids, n_images, temporary)
        _save(temporary, "word_offsets", offsets)
        ranges, buffer_entries = _plan(counts, layout, max_memory, max(shard_sizes, default=0))
        norms = _write_entries(source, layout, temporary, offsets, weights, ranges, buffer_entries, progress)
        scales = np.zeros(n_images)
        np.divide(1.0, np.sqrt(norms), out=scales, where=norms > 0)
        _save(temporary, "image_scales", scales)
        _save(temporary, "word_weights", weights)
        write_metadata(temporary, index_metadata(params, n_images, len(counts), offsets[-1], layout.signature),
                       extra_files)
    return {"n_images": n_images, "n_words": len(counts), "n_entries": int(offsets[-1]), "passes": len(ranges),
            "buffer_bytes": buffer_entries * layout.entry_bytes}


class _Layout:
    """What a source declares, checked: sizes, the entries' dtype, and the shards seen in
    the first pass (each later pass must see the same)."""

    def __init__(self, source):
        self.n_images, self.n_words = int(source.n_images), int(source.n_words)
        dtype, shape = np.dtype(source.signature_dtype), tuple(int(v) for v in source.signature_shape)
        if dtype not in (np.uint8, np.float32) or len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"signatures must be (bytes,) uint8 or (D,) float32, got {dtype} of shape {shape}")
        if self.n_images < 0 or self.n_words < 1 or self.n_images >= 2**31:
            raise ValueError(f"bad source sizes: {self.n_images} images, {self.n_words} words")
        if len(source.ids) != self.n_images:
            raise ValueError(f"{len(source.ids)} ids for {self.n_images} images")
        self.signature = (dtype, shape)
        self.dtype = entry_dtype(dtype, shape)
        self.entry_bytes = 4 + dtype.itemsize * shape[0]
        self.shards = None   # (first image, number of entries) of each shard, once counted

    def columns(self, index, first, entries):
        """``(words, images, signatures)`` of shard ``index``, checked against the layout."""
        if entries.dtype != self.dtype or entries.ndim != 1:
            raise ValueError(f"shard {index} (first image {first}): entries of {entries.dtype}, "
                             f"expected a 1-D array of {self.dtype}")
        if self.shards is not None and (index >= len(self.shards) or self.shards[index] != (first, len(entries))):
            raise RuntimeError(f"shard {index} (first image {first}, {len(entries)} entries) differs from the "
                               "first pass over the source: its shards must be the same on every call")
        entries = np.asarray(entries)  # a plain view of a memmap: numba's type
        return entries["word"], entries["image"], entries["signature"]


def _count(source, layout, progress):
    """Pass 1: entries per word (n_words), and every shard checked: sorted by (word,
    image), words below n_words, images inside the shard (below the next shard's first
    image). Returns (counts, the shards' sizes in bytes)."""
    counts = np.zeros(layout.n_words, dtype=np.int64)
    sizes, shards, previous_end = [], [], 0
    for index, (first, entries) in enumerate(source.shards()):
        first = int(first)
        words, images, signatures = layout.columns(index, first, entries)
        if first < previous_end:
            raise ValueError(f"shard {index}: first image {first}, but images up to {previous_end - 1} came "
                             "before (or it is negative): shards must come in image order")
        bad = check_entries(words, images, layout.n_words, layout.n_images - first)
        if bad >= 0:
            raise ValueError(f"shard {index} (first image {first}): entry {bad} (word {words[bad]}, image "
                             f"{images[bad]}) is out of range or out of (word, image) order")
        count_words(words, layout.n_words, counts)
        if index == 0:
            _warm_kernels(words, images, signatures, layout)
        if len(images):
            previous_end = first + int(images.max()) + 1
        shards.append((first, len(entries)))
        sizes.append(entries.nbytes)
        if progress is not None:
            progress("count", index + 1, None)
    layout.shards = shards
    return counts, sizes


def _warm_kernels(words, images, signatures, layout):
    """The later passes' kernels compiled (or loaded from numba's cache) for the shards'
    array types now, on no entries: their code is loaded before the ranges' buffer is, not
    an unplanned addition during the first range."""
    dtype, shape = layout.signature
    lo, hi = word_slice(words, 0, 0)
    out_images, out_signatures = np.empty(0, dtype=np.int32), np.empty((0,) + shape, dtype=dtype)
    scatter_range(words[lo:hi], images[lo:hi], signatures[lo:hi], 0, 0, np.zeros(0, dtype=np.int64), out_images,
                  out_signatures)
    accumulate_norms(out_images, np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))


def _write_ids(ids, n_images, temporary):
    """``ids.npy`` (UTF-8 bytes end to end) and ``id_offsets.npy``, streamed in two passes
    over ``ids``; refused when not str or not unique (64-bit hashes sorted, then the
    colliding ids compared: 8 bytes per id rather than a set of them)."""
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    hashes = np.empty(n_images, dtype=np.int64)
    position = 0
    for chunk in _chunks(ids):
        encoded = [i.encode("utf-8", "surrogatepass") for i in chunk]
        offsets[position + 1:position + len(chunk) + 1] = np.fromiter(map(len, encoded), np.int64, len(encoded))
        hashes[position:position + len(chunk)] = np.fromiter(map(hash, chunk), np.int64, len(chunk))
        position += len(chunk)
    if position != n_images:
        raise ValueError(f"{position} ids for {n_images} images")
    _check_unique(ids, hashes)
    del hashes
    np.cumsum(offsets, out=offsets)
    with open(os.path.join(temporary, "ids.npy"), "wb") as handle:
        handle.write(_npy_header(np.uint8, (int(offsets[-1]),)))
        for chunk in _chunks(ids):
            data, _ = encode_ids(chunk)
            handle.write(data.data)
        _close(handle)
    _save(temporary, "id_offsets", offsets)


def _chunks(ids):
    """Lists of ids (str; paths as their str), ``_ID_CHUNK`` at a time."""
    iterator = iter(ids)
    while chunk := list(islice(iterator, _ID_CHUNK)):
        chunk = [os.fspath(i) if isinstance(i, os.PathLike) else i for i in chunk]
        if not all(isinstance(i, str) for i in chunk):
            raise TypeError("ids must be strings (or paths)")
        yield chunk


def _check_unique(ids, hashes):
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    duplicates = [ids[int(order[j])] for j in same if ids[int(order[j])] == ids[int(order[j + 1])]]
    if duplicates:
        raise ValueError(f"duplicate ids ({len(duplicates)}, e.g. {duplicates[0]!r}): each id must be unique")


def _plan(counts, layout, max_memory, largest_shard):
    """Word ranges ``(start, end)`` whose entries fit the buffer, and the buffer's size in
    entries: what ``max_memory`` leaves after the per-image and per-word arrays, a shard's
    worth of mapped pages and 32 MiB of slack. A word longer than the buffer is a range of
    its own, written in pieces.

    The budget is the build's own: what the process held before (its imports, a caller's
    data) is not counted, so that the same ``max_memory`` builds the same ranges in a
    fresh command and in a long-lived process (a notebook, a test run)."""
    fixed = 8 * layout.n_images + 32 * layout.n_words + largest_shard + _SLACK
    buffer_entries = min((int(max_memory) - fixed) // layout.entry_bytes, int(counts.sum()))
    if buffer_entries < 1 and counts.sum():
        raise MemoryError(f"max_memory={max_memory:,} bytes leaves no room for the entries' buffer: "
                          f"{fixed:,} are needed besides (per-image and per-word arrays, a shard, slack)")
    ranges, start, held = [], 0, 0
    for word, count in enumerate(counts.tolist()):
        if held and held + count > buffer_entries:
            ranges.append((start, word))
            start, held = word, 0
        held += count
    if held or not ranges:
        ranges.append((start, len(counts)))
    return ranges, max(buffer_entries, 0)


def _write_entries(source, layout, temporary, offsets, weights, ranges, buffer_entries, progress):
    """Passes 3...: each word range laid out in the buffer and appended to the entry
    files; returns the images' norms sum_c w_c (added in the order of the laid-out
    entries, as ASMKIndex's bincount adds them)."""
    dtype, shape = layout.signature
    n_entries = int(offsets[-1])
    norms = np.zeros(layout.n_images)
    buffer_images = np.empty(buffer_entries, dtype=np.int32)
    buffer_signatures = np.empty((buffer_entries,) + shape, dtype=dtype)
    with open(os.path.join(temporary, "entry_images.npy"), "wb") as images_file, \
            open(os.path.join(temporary, "entry_signatures.npy"), "wb") as signatures_file:
        images_file.write(_npy_header(np.int32, (n_entries,)))
        signatures_file.write(_npy_header(dtype, (n_entries,) + shape))
        for done, (start, end) in enumerate(ranges):
            size = int(offsets[end] - offsets[start])
            pieces = _range_pieces if size <= buffer_entries else _word_pieces
            for images, signatures, counts in pieces(source, layout, offsets, start, end, buffer_images,
                                                     buffer_signatures):
                accumulate_norms(images, counts, weights[start:end], norms)
                images_file.write(images.data)
                signatures_file.write(signatures.data)
            if progress is not None:
                progress("write", done + 1, len(ranges))
        _close(images_file)
        _close(signatures_file)
    return norms


def _range_pieces(source, layout, offsets, start, end, buffer_images, buffer_signatures):
    """Words ``start..end-1``, whose entries fit the buffer: one pass over the shards,
    each shard's slice scattered to its words' cursors; yields the filled buffer once."""
    cursor = offsets[start:end] - offsets[start]
    for index, (first, entries) in enumerate(source.shards()):
        words, images, signatures = layout.columns(index, int(first), entries)
        lo, hi = word_slice(words, start, end)
        scatter_range(words[lo:hi], images[lo:hi], signatures[lo:hi], int(first), start, cursor, buffer_images,
                      buffer_signatures)
    _check_filled(cursor, offsets[start + 1:end + 1] - offsets[start], start)
    size = int(offsets[end] - offsets[start])
    yield buffer_images[:size], buffer_signatures[:size], np.diff(offsets[start:end + 1])


def _word_pieces(source, layout, offsets, start, end, buffer_images, buffer_signatures):
    """One word (``end == start + 1``) with more entries than the buffer: each shard's
    slice, in shard order (images increasing), yielded as it is read."""
    written = 0
    for index, (first, entries) in enumerate(source.shards()):
        words, images, signatures = layout.columns(index, int(first), entries)
        lo, hi = word_slice(words, start, end)
        for piece in range(lo, hi, max(len(buffer_images), 1)):
            stop = min(hi, piece + len(buffer_images))
            n = stop - piece
            buffer_images[:n] = images[piece:stop]
            buffer_images[:n] += int(first)
            buffer_signatures[:n] = signatures[piece:stop]
            written += n
            yield buffer_images[:n], buffer_signatures[:n], np.array([n], dtype=np.int64)
    _check_filled(np.array([written]), np.diff(offsets[start:end + 1]), start)


def _check_filled(cursor, ends, start):
    if not np.array_equal(cursor, ends):
        word = start + int(np.flatnonzero(cursor != ends)[0])
        raise RuntimeError(f"word {word}: the shards held other entries than when counted (the source changed "
                           "between passes)")


def _npy_header(dtype, shape):
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and
    ``shape`` (format 1.0), so the data can follow in pieces."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue()


def _save(temporary, key, array):
    with open(os.path.join(temporary, f"{key}.npy"), "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        _close(handle)


def _close(handle):
    handle.flush()
    os.fsync(handle.fileno())
