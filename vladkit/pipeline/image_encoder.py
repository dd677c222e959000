"""From images straight to vectors, batch by batch: the path for datasets that do not fit
in memory as descriptors (dense SIFT on 15-Scene alone is ~18 GB of float32)."""

from __future__ import annotations

import contextlib
import itertools
from contextlib import contextmanager

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .word_sets import is_word_set_encoder, word_set_accumulation
from .budget import DEFAULT_MAX_MEMORY, iter_batches, parse_memory
from ..encoders import BoFEncoder, SpatialPyramid
from ..features.extractors import LocalFeatures, _check_images, _empty_features
from ..vocabulary.sampling import DescriptorSampler

__all__ = ["ImageEncoder", "encode_batches", "sample_features"]


class ImageEncoder(TransformerMixin, BaseEstimator):
    """A local-feature extractor and an encoder, streamed over images under a memory budget.

    ``fit`` extracts the images batch by batch and keeps only a bounded sample of each
    image's descriptors (:class:`vladkit.DescriptorSampler`: at most ``max_descriptors`` in
    all, spread over the images), then fits the encoder (its vocabulary, PCA, ...) on the
    sample. ``transform`` extracts and encodes batch by batch. Batches are sized by the
    memory their descriptors take, read from each file's header before decoding
    (:mod:`vladkit.pipeline.budget`): up to ``batch_size`` thumbnails together, a few phone photos,
    and an image too large for ``max_memory`` on its own is extracted and encoded in pieces
    (the encoders' statistics are sums). The working memory stays within ``max_memory``
    whatever the number and size of the images; the output matrix comes on top. The
    result equals ``encoder.transform(extractor.transform(images))`` up to float32
    rounding (the sums are added in another order; below 1e-6).

    A :class:`BoFEncoder` with ``tf_idf`` (alone or in a :class:`SpatialPyramid`) learns
    its idf weights from whole images, as ``BoFEncoder.fit`` on all the images'
    descriptors does (in the sample, a few descriptors per image, most words would seem
    rarer than they are): ``fit`` counts the words that occur in each whole image. When
    the vocabulary is trained by ``fit``, this is a second pass over the images after the
    sample's, extracting and assigning all their descriptors: it costs about as much as
    ``transform`` on the training images (measured: 7 s on top of a 39 s fit, 60
    images of 200 x 200 pixels, dense SIFT, 200 words). With a trained vocabulary (a
    fitted object or a file) and hard assignment (or a given ``sigma``), the words are
    counted in the sample's pass, at the cost of assigning the descriptors.

    ``make_pipeline(ImageEncoder(DenseSIFT(root=True), FisherEncoder(64)), LinearSVC())``
    is a classifier from image files.

    Parameters
    ----------
    extractor : SIFT or DenseSIFT
    encoder : BoFEncoder, VLADEncoder, FisherEncoder, LLCEncoder, SuperVectorEncoder or SpatialPyramid
    batch_size : int, default=64
        At most this many images extracted and encoded together.
    max_memory : int or str, default=1_000_000_000
        Working-memory budget in bytes, or a size such as ``"512MB"`` or ``"2GB"``
        (see :func:`vladkit.pipeline.budget.parse_memory`). At least 256 MB.
    max_descriptors : int, default=200_000
        Descriptors kept from the training images to fit the encoder (they are held on
        top of the budget: 200,000 x 128 float32 is 100 MB).
    max_per_image : int or None, default=None
    random_state : int, RandomState or None
        Seeds the sample (the encoder has its own ``random_state``).

    Attributes
    ----------
    extractor_, encoder_ : fitted clones
    n_features_out_ : int
    """

    def __init__(self, extractor, encoder, *, batch_size=64, max_memory=DEFAULT_MAX_MEMORY,
                 max_descriptors=200_000, max_per_image=None, random_state=None):
        self.extractor = extractor
        self.encoder = encoder
        self.batch_size = batch_size
        self.max_memory = max_memory
        self.max_descriptors = max_descriptors
        self.max_per_image = max_per_image
        self.random_state = random_state

    def _batches(self, images, encoder=None, streamed=False):
        return iter_batches(self.extractor_, images, max_memory=parse_memory(self.max_memory),
                            max_images=self.batch_size, encoder=encoder, streamed=streamed)

    def fit(self, X, y=None):
        """Extract a bounded sample of descriptors from the images and fit the encoder.

        Parameters
        ----------
        X : list of images (paths, bytes or arrays)
        y : ignored
        """
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        parse_memory(self.max_memory)  # a bad budget is refused before any work
        images = _check_images(X)
        if not images:
            raise ValueError("X holds no images")
        self.extractor_ = clone(self.extractor)
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        sampler = DescriptorSampler(len(images), self.max_descriptors, self.max_per_image, seed)
        # tf-idf: the document frequencies of whole images, counted in this pass when the
        # encoder can assign words before it is fitted on the sample, else in a second one.
        frequencies = _DocumentFrequencies.before_fit(self.encoder, self.extractor_)
        kept = []
        for batch in self._batches(images, None if frequencies is None else frequencies.encoder):
            # Keep the sampled descriptors with their positions (a spatial pyramid's
            # encoder is fitted on descriptors only, but stays given LocalFeatures).
            if frequencies is None:
                kept.extend(sample_features(sampler, index, pieces, self.extractor_) for index, pieces in batch)
            else:
                with frequencies.counting(len(batch)) as accumulation:
                    # An image's pieces can be read once: each is counted as it is sampled.
                    kept.extend(sample_features(sampler, index, _adding(accumulation, position, pieces),
                                                self.extractor_)
                                for position, (index, pieces) in enumerate(batch))
            del batch  # not alive while the next batch is extracted
        self.encoder_ = clone(self.encoder).fit(kept)
        del kept
        bof = _tf_idf_encoder(self.encoder_)
        if bof is not None:
            if frequencies is None:
                frequencies = _DocumentFrequencies(self.encoder_)
                for batch in self._batches(images, self.encoder_):
                    with frequencies.counting(len(batch)) as accumulation:
                        for position, (_, pieces) in enumerate(batch):
                            for piece in pieces:
                                accumulation.add(position, piece)
                    del batch  # not alive while the next batch is extracted
            bof._set_idf(frequencies.counts, frequencies.n_images)
        self.n_features_out_ = self.encoder_.n_features_out_
        return self

    def transform(self, X):
        """Extract and encode the images, batch by batch within ``max_memory``.

        Returns
        -------
        ndarray ``(n_images, n_features_out_)``, float32
        """
        check_is_fitted(self, "encoder_")
        images = _check_images(X)
        out = np.empty((len(images), self.n_features_out_), dtype=np.float32)
        batches = self._batches(images, self.encoder_, streamed=True)
        for indices, vectors in encode_batches(self.encoder_, batches):
            out[indices] = vectors
        return out

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "encoder_")
        return self.encoder_.get_feature_names_out()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X is a list of images, as the extractors take (paths, bytes, pixel arrays, or a
        # 3-D stack of grey images); not a 2-D array of samples.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = ["float32"]  # float32 vectors
        return tags


def encode_batches(encoder, batches):
    """Encode the batches :func:`vladkit.pipeline.budget.iter_batches` yields, pieces included.

    Yields
    ------
    (indices, vectors)
        The images' indices and their (len(indices), dim) float32 vectors, per batch.
    """
    for batch in batches:
        indices, vectors = _encode_batch(encoder, batch)
        del batch  # not alive while the next batch is extracted
        if indices:  # (a streamed batch whose every image was unreadable has none)
            yield indices, vectors


def encode_rows(encoder, batches, n_images, progress=None):
    """Every image of the batches encoded, in input order (:func:`encode_batches`).

    Returns
    -------
    encoded : (n_images, dim) float32 ndarray, or for a word-set encoder (ASMK) a list of
        n_images WordSignatures; the rows of unread images are zeros (None)
    read : (n_images,) bool ndarray, which images were encoded
    progress : callable(n), optional
        Told the number of images finished after each batch (unread ones included).
    """
    word_sets = is_word_set_encoder(encoder)
    encoded = [None] * n_images if word_sets else np.zeros((n_images, encoder.n_features_out_), dtype=np.float32)
    read = np.zeros(n_images, dtype=bool)
    done = 0
    for rows, batch in encode_batches(encoder, batches):
        read[rows] = True
        if word_sets:
            for row, item in zip(rows, batch):
                encoded[row] = item
        else:
            encoded[rows] = batch
        if progress is not None:
            progress(rows[-1] + 1 - done)
            done = rows[-1] + 1
    if progress is not None and done < n_images:
        progress(n_images - done)
    return encoded, read


def _tf_idf_encoder(encoder):
    """The BoFEncoder with ``tf_idf`` that is ``encoder`` or that a SpatialPyramid
    ``encoder`` wraps (its fitted one if fitted, else its template), or None."""
    if isinstance(encoder, SpatialPyramid):
        encoder = getattr(encoder, "encoder_", encoder.encoder)
    return encoder if isinstance(encoder, BoFEncoder) and encoder.tf_idf else None


class _DocumentFrequencies:
    """In how many images each word of a tf-idf BoFEncoder occurs, counted on whole
    images streamed batch by batch (see :meth:`BoFEncoder._set_idf`).

    Parameters
    ----------
    encoder : fitted BoFEncoder with tf_idf, or SpatialPyramid of one
        Its words are assigned (a pyramid's encoder counts whole images, not cells: it
        is fitted on whole images too).
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.bof = _tf_idf_encoder(encoder)
        self.counts = np.zeros(self.bof.vocabulary_.n_words_, dtype=np.int64)
        self.n_images = 0

    @classmethod
    def before_fit(cls, encoder, extractor):
        """Counting for an unfitted ``encoder`` whose fit on the sample would not change
        how words are assigned (:meth:`BoFEncoder._fits_without_sample`), or None."""
        bof = _tf_idf_encoder(encoder)
        if bof is None or not bof._fits_without_sample():
            return None
        # Fitted on no descriptors: the given vocabulary, nothing else to learn.
        return cls(clone(encoder).fit([_empty_features(extractor._descriptor_dim, (0, 0))]))

    @contextmanager
    def counting(self, n_images):
        """An Accumulation for a batch of ``n_images`` images (add their descriptors to
        it, by position in the batch); counted when the block ends."""
        with self.bof._thread_limits():
            accumulation = self.bof._accumulate(n_images)
            yield accumulation
            self.counts += self.bof._document_frequency(accumulation)
        self.n_images += n_images


def _adding(accumulation, position, pieces):
    """The pieces of an image, each added to ``accumulation`` as image ``position``
    as it is read."""
    for piece in pieces:
        accumulation.add(position, piece)
        yield piece


def _encode_batch(encoder, batch):
    """(indices, vectors) of a batch: a list, or a :class:`~vladkit.pipeline.budget.StreamedBatch`
    encoded image by image as its images are extracted (which may leave some out)."""
    indices = []
    word_sets = is_word_set_encoder(encoder)
    # (an ASMK encoder bounds its own numba threads; it makes no BLAS call of its own)
    with contextlib.nullcontext() if word_sets else encoder._thread_limits():
        accumulation = word_set_accumulation(encoder, len(batch)) if word_sets else encoder._accumulate(len(batch))
        for position, (index, pieces) in enumerate(batch):
            indices.append(index)
            for piece in pieces:
                accumulation.add(position, piece)
        return indices, accumulation.finish()[:len(indices)]


def sample_features(sampler, index, pieces, extractor):
    """The rows of image ``index`` that belong to ``sampler``'s sample, as LocalFeatures,
    from its whole features or from its pieces (see :func:`vladkit.pipeline.budget.iter_batches`)."""
    pieces = iter(pieces)
    first = next(pieces, None)
    if first is None:
        return _empty_features(extractor._descriptor_dim, (0, 0))
    second = next(pieces, None)
    if second is None:  # whole
        rows = sampler.select(index, len(first))
        return LocalFeatures(first.descriptors[rows], first.positions[rows], first.scales[rows],
                             first.image_shape)
    # In pieces: the rows are drawn as for the whole image when the count is known before
    # extraction (dense SIFT's grid). With low-contrast descriptors dropped it is only
    # bounded by the grid's: each piece then gives its share of the image's quota.
    total, exact = extractor.n_descriptors(*first.image_shape)
    selected = sampler.select(index, total) if exact else None
    kept, offset = [], 0
    for number, piece in enumerate(itertools.chain([first, second], pieces)):
        if selected is not None:
            rows = selected[(selected >= offset) & (selected < offset + len(piece))] - offset
        else:
            rows = sampler.select_share(index, number, len(piece), len(piece) / total)
        offset += len(piece)
        kept.append(LocalFeatures(piece.descriptors[rows], piece.positions[rows], piece.scales[rows],
                                  piece.image_shape))
    return LocalFeatures(*(np.concatenate([getattr(p, name) for p in kept])
                           for name in ("descriptors", "positions", "scales")), first.image_shape)
