"""Memory budgets: images streamed in batches sized by the memory their features take.

A batch counted in images is bounded only while images are small: dense SIFT at step 4
gives ~7,700 descriptors (4 MB) for a 200 x 200 thumbnail but ~3 million (1.5 GB) for a
12-megapixel photo. So the streaming paths (:class:`vladkit.ImageEncoder`,
``vladkit vocab build`` and ``vladkit encode``) plan their batches from each image's
size, read from the file header before anything is decoded:

* every image's cost is estimated by its extractor (:meth:`memory_estimate`: the
  descriptors it returns plus the transient scratch computing them) and by the encoder
  (its per-image sums, and the fixed scratch of one chunk of rows);
* consecutive images form a batch while the batch's descriptors, plus the scratch of the
  images extracted in parallel, plus the encoder's share fit in ``max_memory`` (and at
  most ``max_images`` images: progress and resumable shards stay fine-grained);
* an image that does not fit alone is extracted in pieces (dense SIFT band by band) that
  are encoded one after another: the encoders' statistics are sums, so the vector is the
  same (to float32 rounding) as if the image had been encoded whole.

Outside the budget: the output matrix, the interpreter and its libraries (~0.3-0.5 GB
resident for numpy, OpenCV, scikit-learn, numba and faiss), and what the caller keeps
(a vocabulary's training sample).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator

from .._util.defaults import DEFAULT_MAX_MEMORY, MIN_MAX_MEMORY, parse_memory  # noqa: F401 (defined there for the CLI)
from .._util.threads import effective_n_jobs
from ..features.images import ImageReadError, read_size

__all__ = ["DEFAULT_MAX_MEMORY", "ImageBatch", "encoder_memory", "iter_batches", "parse_memory"]


#: Pieces are not made smaller than this (a band's scratch is recomputed at its edges).
MIN_PIECE_BYTES = 16 * 10**6


def encoder_memory(encoder):
    """``(fixed, per_image)`` bytes a fitted encoder needs while encoding a batch.

    ``fixed``: one chunk of rows (``CHUNK_ROWS``) as packed, projected and expanded, and
    its (rows, K) scores and weights. ``per_image``: the image's sums and vector (a
    spatial pyramid's cells each have their own), and the normalisation temporaries.
    ``encoder=None`` (extraction only) costs nothing.
    """
    if encoder is None:
        return 0, 0
    from .word_sets import is_word_set_encoder, word_set_memory

    if is_word_set_encoder(encoder):
        return word_set_memory(encoder)
    from ..encoders._base import CHUNK_ROWS
    from ..encoders.fisher import FisherEncoder
    from ..encoders.netvlad import NetVLADEncoder

    if hasattr(encoder, "encoders_"):
        # MultiVocabulary: its encoders flush their chunks one after the other (the
        # largest scratch counts), and each keeps its own per-image sums and vector.
        parts = [encoder_memory(part) for part in encoder.encoders_]
        return max(fixed for fixed, _ in parts), sum(per_image for _, per_image in parts) + 4 * encoder.n_features_out_
    inner = getattr(encoder, "encoder_", encoder)
    if isinstance(inner, NetVLADEncoder):
        # No vocabulary: K clusters of the descriptors' own dimension (no PCA); the chunk,
        # its scores and their float64 copies fit the same count.
        params = inner.params_
        n_words, dim_in, dim = params.n_clusters, params.dim, params.dim
    else:
        vocabulary = inner.vocabulary_
        n_words, dim_in, dim = vocabulary.n_words_, vocabulary.descriptor_dim_, vocabulary.dim_
    fixed = CHUNK_ROWS * 4 * (2 * dim_in + 3 * dim + 3 * n_words)
    if isinstance(inner, FisherEncoder):
        # Its log-densities are computed in float64: centred rows, [x^2, x], the scores.
        fixed += CHUNK_ROWS * 8 * (3 * dim + n_words)
    per_image = 8 * 3 * encoder.n_features_out_ + 16 * n_words * getattr(encoder, "n_cells_", 1)
    return fixed, per_image


@dataclass
class ImageBatch:
    """Images to extract together: ``indices`` into the input list, and for a batch of one
    image too large for the budget, ``piece_bytes`` (extract it in pieces of that size)."""

    indices: list
    piece_bytes: int | None = None


def plan_batches(images, extractor, max_memory, max_images, encoder=None) -> Iterator[ImageBatch]:
    """Group consecutive images into batches that fit ``max_memory`` (see the module doc).

    Lazily: a folder of a million images starts at once, one header read per image. An
    image whose header cannot be read (or whose format the header reader does not know)
    forms a batch of its own and is extracted in pieces (a single piece if it is small).
    """
    fixed, per_image = encoder_memory(encoder)
    budget = max_memory - fixed
    n_threads = effective_n_jobs(extractor.n_jobs) or 1
    # Scratch held at once: the images of a batch are extracted one per thread, but a
    # batch of one image puts every thread on it, and an extractor that splits (dense
    # SIFT) then computes n_threads bands at once, each with an image's band scratch.
    # Counted as n_threads for such extractors whatever the batch (at most the decoded
    # image over-counted), as min(n_threads, images) for the others.
    def concurrent(n_images):
        return n_threads if extractor._splits else min(n_threads, n_images)

    current, outputs, scratch = [], 0, 0
    for index, image in enumerate(images):
        size = read_size(image, max_side=extractor.max_side)
        if size is None:
            # Unknown until decoded: alone, and in pieces (one piece if it is small).
            if current:
                yield ImageBatch(current)
            current, outputs, scratch = [], 0, 0
            yield ImageBatch([index], piece_bytes=_piece_bytes(budget - per_image, 0, n_threads))
            continue
        height, width, decoded = size
        output, image_scratch = extractor.memory_estimate(height, width, decoded)
        output += per_image
        need = (outputs + output) + concurrent(len(current) + 1) * max(scratch, image_scratch)
        if current and (len(current) >= max_images or need > budget):
            yield ImageBatch(current)
            current, outputs, scratch = [], 0, 0
        if output + concurrent(1) * image_scratch > budget:
            if not extractor._splits:
                warnings.warn(
                    f"{_name(image)}: {type(extractor).__name__} of a {width} x {height} image needs "
                    f"about {(output + image_scratch) / 1e9:.1f} GB at once, over the budget of "
                    f"{max_memory / 1e9:.1f} GB, and cannot be split: set max_side (--max-side) "
                    "to bound it", ResourceWarning, stacklevel=3)
            yield ImageBatch([index], piece_bytes=_piece_bytes(budget - per_image, height * width, n_threads))
            continue
        current.append(index)
        outputs += output
        scratch = max(scratch, image_scratch)
    if current:
        yield ImageBatch(current)


def _name(image):
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"


def _piece_bytes(budget, pixels, n_threads):
    # The grey image stays in memory while its pieces are made; n_threads pieces are
    # computed ahead, one is being encoded and one may wait in the encoder's chunk.
    return max(MIN_PIECE_BYTES, (budget - 2 * pixels) // (n_threads + 2))


def iter_batches(extractor, images, *, max_memory, max_images=64, encoder=None,
                 on_unreadable=None, streamed=False) -> Iterator[list]:
    """Extract images batch by batch under a memory budget.

    Parameters
    ----------
    extractor : SIFT or DenseSIFT
    images : list of images (paths, bytes or arrays)
    max_memory : int
        Budget in bytes (see the module docstring for what it covers).
    max_images : int
        At most this many images per batch.
    encoder : fitted encoder or None
        Whose working memory the budget must also hold (:func:`encoder_memory`).
    on_unreadable : callable(index, ImageReadError) or None
        None: an unreadable image is the extractor's business (``on_error``: raise, or
        empty features). A callable: it is told, and the image is left out of its batch.
    streamed : bool
        A batch of several whole images is an iterable (:class:`StreamedBatch`) that
        gives each image as soon as it is extracted, the extractor's threads working
        ahead, instead of a list made once all are: an encoder consuming it encodes an
        image while the next ones are extracted (both use every core: on 2 cores, the
        main job is 20-25% faster). Its length is the number of images planned; an
        unreadable one is left out as it comes. For consumers that iterate once.

    Yields
    ------
    list of (index, pieces)
        One entry per image of a batch, in input order. ``pieces`` is an iterable of
        :class:`~vladkit.LocalFeatures` of that image: one whole piece, or for an image
        larger than the budget a lazy sequence of pieces, to be consumed in order before
        the next batch is asked for. Drop your references to a batch before asking for
        the next one, or two batches will be in memory at once.
    """
    images = list(images)
    for batch in plan_batches(images, extractor, max_memory, max_images, encoder):
        if batch.piece_bytes is None and len(batch.indices) > 1 and streamed:
            yield StreamedBatch(extractor, images, batch.indices, on_unreadable)
            continue
        if batch.piece_bytes is None and len(batch.indices) > 1:
            results = _extract_batch(extractor, images, batch.indices, on_unreadable)
            if results:  # (empty if every image of it was unreadable)
                yield results
            del results  # not alive while the next batch is extracted
            continue
        index = batch.indices[0]
        try:
            if batch.piece_bytes is None:
                pieces = extractor.transform([images[index]])  # one image: every thread on it
            else:
                pieces = extractor.extract_pieces(images[index], batch.piece_bytes)
        except ImageReadError as error:
            if on_unreadable is None:
                raise
            on_unreadable(index, error)
            continue
        yield [(index, pieces)]
        del pieces  # not alive while the next batch is extracted


class StreamedBatch:
    """A batch of whole images whose (index, [features]) come as each is extracted (see
    :func:`iter_batches`' ``streamed``); iterate it once."""

    def __init__(self, extractor, images, indices, on_unreadable):
        self._extractor, self._images, self._indices = extractor, images, indices
        self._on_unreadable = on_unreadable

    def __len__(self):
        """The images planned (unreadable ones, left out, make the batch shorter)."""
        return len(self._indices)

    def __iter__(self):
        results = self._extractor._iter_transform([self._images[i] for i in self._indices])
        try:
            for index, item in zip(self._indices, results):
                if isinstance(item, ImageReadError):
                    if self._on_unreadable is None:
                        raise item
                    self._on_unreadable(index, item)
                    continue
                yield index, [item]
        finally:
            results.close()  # (the threads working ahead stop with the consumer)


def _extract_batch(extractor, images, indices, on_unreadable):
    try:
        features = extractor.transform([images[i] for i in indices])
        return [(index, [item]) for index, item in zip(indices, features)]
    except ImageReadError:
        if on_unreadable is None:
            raise
    results = []  # isolate the bad file(s): one image at a time
    for index in indices:
        try:
            results.append((index, extractor.transform([images[index]])))
        except ImageReadError as error:
            on_unreadable(index, error)
    return results
