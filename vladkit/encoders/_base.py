"""What every encoder shares: input handling, the vocabulary, chunked streaming of rows."""

from __future__ import annotations

import os
from functools import reduce

import numba
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from .._util.threads import kernel_threads, single_threaded_blas
from ..kernels.accumulate import add_task_rows, all_finite
from ..vocabulary.base import _Vocabulary
from ..vocabulary.loading import load_vocabulary

#: Rows (descriptors) per chunk: bounds the (rows, K) distance / posterior scratch.
CHUNK_ROWS = 1 << 15


def check_params(estimator, positive_ints=(), positive_or_none=(), choices=None):
    """Raise ValueError naming the first parameter of ``estimator`` out of its range."""
    for name in positive_ints:
        value = getattr(estimator, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in positive_or_none:
        value = getattr(estimator, name)
        if value is not None and not (isinstance(value, (int, float, np.number))
                                      and np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    for name, allowed in (choices or {}).items():
        if getattr(estimator, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(estimator, name)!r}")


def descriptor_sets(X):
    """The (n_i, D) descriptor arrays of X: a list of LocalFeatures or of 2-D arrays."""
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype != object:
        raise TypeError(
            "X must be a list with one descriptor set per image (LocalFeatures or (n_i, D) "
            f"arrays), got one 2-D array of shape {X.shape}; wrap it as [X] for one image"
        )
    sets = []
    for index, item in enumerate(X):
        descriptors = np.asarray(getattr(item, "descriptors", item))
        if descriptors.ndim != 2:
            raise ValueError(
                f"image {index}: descriptors must be a 2-D (n, D) array, got shape {descriptors.shape}"
            )
        if descriptors.dtype.kind not in "fiu":
            raise TypeError(f"image {index}: descriptors must be numeric, got dtype {descriptors.dtype}")
        sets.append(descriptors)
    return sets


class Accumulation:
    """Descriptor sets streamed into an encoder's per-image sums, chunk by chunk.

    Every encoder's statistics are sums over an image's descriptors (or, for
    :class:`~vladkit.encoders.llc.LLCEncoder`'s max pooling, running maxima, which
    combine as freely), so an image can be given whole or in pieces, in any number of
    ``add`` calls and in any order (consecutive pieces of one image join one segment of a
    chunk). Rows are packed into chunks of at most
    ``max_rows`` (which bound the (rows, K) assignment scratch) and handed to the
    encoder's ``_add``; ``finish`` normalises and returns the vectors.

    Parameters
    ----------
    encoder : a fitted BaseEncoder
    n_images : int
    dtype : float32 or float64, the precision of the sums
    """

    def __init__(self, encoder, n_images, dtype, max_rows=CHUNK_ROWS):
        self.encoder = encoder
        self.sums = encoder._start(n_images, dtype)
        self.counts = np.zeros(n_images, dtype=np.int64)
        self._dim = encoder._input_dim()
        self._dtype = dtype
        self._max_rows = max_rows
        self._parts, self._segments, self._rows = [], [], 0

    def add(self, image, descriptors):
        """Add (n, D) descriptors (or LocalFeatures) of image number ``image``."""
        descriptors = np.asarray(getattr(descriptors, "descriptors", descriptors))
        if not len(descriptors):
            return
        if descriptors.shape[1] != self._dim:
            raise ValueError(
                f"image {image}: descriptors have dimension {descriptors.shape[1]}, the "
                f"vocabulary expects {self._dim}"
            )
        self.counts[image] += len(descriptors)
        start = 0
        while start < len(descriptors):
            take = min(len(descriptors) - start, self._max_rows - self._rows)
            part = descriptors[start:start + take]
            if not all_finite(part):
                raise ValueError(f"image {image}: descriptors contain NaN or inf")
            self._parts.append(part)
            if self._segments and self._segments[-1][0] == image:
                self._segments[-1][2] += take
            else:
                self._segments.append([image, self._rows, self._rows + take])
            self._rows += take
            start += take
            if self._rows == self._max_rows:
                self.flush()

    def flush(self):
        """Hand the rows gathered so far to the encoder."""
        if not self._rows:
            return
        chunk, segments = _pack(self._parts, self._dtype), np.array(self._segments, dtype=np.int64)
        self._parts, self._segments, self._rows = [], [], 0
        # (already so inside the encoder's _thread_limits; a caller that did not enter
        # them still gets one BLAS thread per kernel thread, and the same vectors)
        with single_threaded_blas():
            self.encoder._add(self.encoder._project(chunk), segments, self.sums)

    def finish(self, dtype=np.float32):
        """The (n_images, n_features_out_) vectors, float32 (``transform``'s output) unless
        another ``dtype`` is asked for (the functional API keeps float64)."""
        self.flush()
        vectors = self.encoder._finish(self.sums, self.counts)
        return np.ascontiguousarray(vectors, dtype=dtype)


def split_tasks(segments, n_threads=None):
    """Cut a chunk's segments into parallel tasks: (image, first row, end row) rows.

    A chunk may hold a single large image; splitting it into pieces of at most
    rows / (2 threads) lets every core work on it. Pieces of one image stay consecutive.
    """
    n_threads = n_threads or numba.get_num_threads()
    total = int((segments[:, 2] - segments[:, 1]).sum())
    piece = max(1024, -(-total // (2 * n_threads)))
    tasks = [(image, start, min(start + piece, end))
             for image, first, end in segments.tolist() for start in range(first, end, piece)]
    return np.array(tasks, dtype=np.int64).reshape(-1, 3)


def add_tasks(target, tasks, values):
    """target[image] += sum of the values of that image's tasks. Consecutive tasks of an
    image are summed first; an image may come back later in the chunk (the pieces of an
    image, each cut into pyramid cells), hence the unbuffered ``np.add.at``."""
    if not len(tasks):
        return
    if not target.flags.c_contiguous:  # (every encoder's sums are; a view could not be written through)
        for (image, _, _), value in zip(tasks.tolist(), values):
            target[image] += value
        return
    width = int(np.prod(target.shape[1:], dtype=np.int64))
    add_task_rows(target.reshape(len(target), width), np.ascontiguousarray(tasks[:, 0]),
                  values.reshape(len(values), width).astype(target.dtype, copy=False))


def max_tasks(target, tasks, values):
    """target[image] = max(target[image], the values of that image's tasks), element-wise:
    :func:`add_tasks` for a running maximum (max pooling is associative too, so pieces
    and chunks of an image combine in any order)."""
    images = tasks[:, 0]
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    np.maximum.at(target, images[starts], np.maximum.reduceat(values, starts, axis=0).astype(target.dtype, copy=False))


def encode_whole(encoder, items, dtype):
    """Encode whole images (descriptor sets or LocalFeatures, one per image) through the
    encoder's accumulation, under its thread limits: ``transform`` of every encoder."""
    with encoder._thread_limits():
        accumulation = encoder._accumulate(len(items), dtype)
        for image, item in enumerate(items):
            accumulation.add(image, item)
        return accumulation.finish()


def _pack(parts, dtype):
    """The parts as one C-contiguous array of ``dtype``: a copy, except for a single part
    that is one already (a large image fills a chunk on its own: copying it would cost as
    much as the rest of VLAD). Encoders must not write into the chunk they are given."""
    if len(parts) == 1 and parts[0].dtype == dtype and parts[0].flags.c_contiguous:
        return parts[0]
    out = np.empty((sum(len(p) for p in parts), parts[0].shape[1]), dtype=dtype)
    row = 0
    for part in parts:
        out[row:row + len(part)] = part
        row += len(part)
    return out


def work_dtype(sets, float32_limit=None):
    """float64 if any image's descriptors are float64 (kept for precision), else float32;
    also float64 if a value exceeds ``float32_limit`` in magnitude (an encoder that
    squares descriptors would overflow float32 beyond ~1e19)."""
    if any(s.dtype == np.float64 for s in sets):
        return np.float64
    if float32_limit is not None and any(s.size and max(s.max(), -s.min()) > float32_limit for s in sets):
        return np.float64
    return np.float32


class BaseEncoder(TransformerMixin, BaseEstimator):
    """Fit resolves the vocabulary; transform streams rows and hands chunks to the subclass.

    Subclasses define ``_vocabulary_class``, ``_size_param``, ``_start(n_images, dtype)``
    returning accumulators, ``_add(chunk, segments, acc)``, ``_finish(acc, counts)``
    returning the (n_images, dim) vectors, and ``n_features_out_``-related names.
    """

    _vocabulary_class = None
    _size_param = None
    _prefix = None
    #: see work_dtype: None, or the magnitude above which float32 input is encoded in float64
    _float32_limit = None

    # -- fit -------------------------------------------------------------------------

    def _resolve_vocabulary(self, X):
        vocabulary = self.vocabulary
        if vocabulary is None:
            vocabulary = self._vocabulary_class(
                getattr(self, self._size_param), max_descriptors=self.max_descriptors,
                pca=self._vocabulary_pca(X), passthrough_dims=getattr(self, "passthrough_dims", 0),
                random_state=self.random_state,
            )
        elif isinstance(vocabulary, (str, os.PathLike)):
            vocabulary = load_vocabulary(vocabulary)
        elif not isinstance(vocabulary, _Vocabulary):
            raise TypeError(
                "vocabulary must be None, a vocabulary file path or a vocabulary object, got "
                f"{type(vocabulary).__name__}"
            )
        if not isinstance(vocabulary, self._vocabulary_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self._vocabulary_class.__name__}, got "
                f"{type(vocabulary).__name__}"
            )
        if not hasattr(vocabulary, "descriptor_dim_"):
            # An unfitted vocabulary (e.g. after sklearn.clone) is a template: train a copy.
            vocabulary = clone(vocabulary).fit(X)
        return vocabulary

    def _vocabulary_pca(self, X):
        """The ``pca`` of the vocabulary ``fit`` trains (None: none)."""
        return getattr(self, "pca", None)

    def set_params(self, **params):
        """Set the parameters of this encoder, including its vocabulary's.

        ``vocabulary__<name>`` parameters never modify the vocabulary object that was
        given: the encoder takes a modified copy. Naming a training parameter of a fitted
        vocabulary (``vocabulary__n_clusters=32``, even with its current value) makes the
        copy unfitted, so ``fit`` trains it on its X with those parameters; ``n_jobs`` and
        ``descriptor_type`` keep the trained words.

        Parameters
        ----------
        **params : dict
            Parameter names and values; ``vocabulary__<name>`` needs a vocabulary object.

        Returns
        -------
        self
        """
        # Why retrain rather than refuse here (a fitted vocabulary alone refuses): a grid
        # search over "encoder__vocabulary__n_clusters" asks for vocabularies of those sizes
        # and the encoder's fit has the data to train them; the given object stays as it is.
        prefix = "vocabulary__"
        nested = {key[len(prefix):]: params.pop(key) for key in list(params) if key.startswith(prefix)}
        vocabulary = params.get("vocabulary", self.vocabulary)
        if nested and not isinstance(vocabulary, _Vocabulary):
            name = next(iter(nested))
            raise ValueError(
                f"cannot set vocabulary__{name}: this {type(self).__name__}'s vocabulary is "
                f"{vocabulary!r}, not a vocabulary object; with vocabulary=None set the "
                f"encoder's own parameters (e.g. {self._size_param}), or pass an unfitted "
                f"vocabulary={self._vocabulary_class.__name__}(...)"
            )
        if nested:
            # A copy, not scikit-learn's in-place nested set_params: the vocabulary is often
            # the user's trained one, shared with other encoders (and a grid search clones
            # the encoder, so the copy is already its own there).
            params["vocabulary"] = vocabulary._with_params(**nested)
        return super().set_params(**params)

    def fit(self, X, y=None):
        """Resolve the vocabulary: train one on X (``vocabulary=None`` or an unfitted
        vocabulary object), load a file path, or take a fitted vocabulary object as is.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        sets = descriptor_sets(X)
        if not sets:
            raise ValueError("X holds no images")
        self.vocabulary_ = self._resolve_vocabulary(sets)
        dims = {s.shape[1] for s in sets if len(s)}
        if dims and dims != {self.vocabulary_.descriptor_dim_}:
            raise ValueError(
                f"descriptors have dimension {sorted(dims)}, the vocabulary expects "
                f"{self.vocabulary_.descriptor_dim_}"
            )
        self._fit_encoding(sets)
        self.n_features_out_ = len(self._feature_names())
        return self

    def _fit_encoding(self, sets):
        """Hook for encoders that learn more than the vocabulary (e.g. idf weights)."""

    # -- transform -------------------------------------------------------------------

    def transform(self, X):
        """Encode each image's descriptors into one vector.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays
            An image with no descriptors gives a vector of zeros.

        Returns
        -------
        ndarray ``(n_images, n_features_out_)``, float32
        """
        check_is_fitted(self, "vocabulary_")
        sets = descriptor_sets(X)
        return encode_whole(self, sets, work_dtype(sets, self._float32_limit))

    def _accumulate(self, n_images, dtype=np.float32):
        """An :class:`Accumulation` of ``n_images`` images (given whole or in pieces)."""
        return Accumulation(self, n_images, dtype)

    def _input_dim(self):
        """The dimension D of the descriptors this encoder takes."""
        return self.vocabulary_.descriptor_dim_

    def _project(self, chunk):
        """A chunk of input rows as the encoder's kernels take them (the vocabulary's PCA)."""
        return self.vocabulary_._project(chunk)

    def _thread_limits(self):
        """numba's threads bounded to ``n_jobs`` inside the block (when set), BLAS on one
        thread: the kernels make their matrix products block by block on numba's threads
        (safe when several threads encode at once, see :func:`~vladkit._util.threads.kernel_threads`)."""
        return kernel_threads(self.n_jobs)

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns, e.g. ``vlad_w3_d17`` (word 3, dimension 17)."""
        check_is_fitted(self, "vocabulary_")
        return np.asarray(self._feature_names(), dtype=object)

    def _word_dim_names(self, prefix):
        vocabulary = self.vocabulary_
        return [f"{prefix}_w{k}_d{d}" for k in range(vocabulary.n_words_) for d in range(vocabulary.dim_)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X is one descriptor set per image (LocalFeatures or (n_i, D) arrays, n_i varying),
        # which no input tag names: not a 2-D array (a 2-D array is refused, see
        # descriptor_sets), so scikit-learn's data checks do not apply. Sets of equal size
        # stacked in a 3-D (n_images, n, D) array are taken as well.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        # The vectors are float32 whatever the descriptors' dtype.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def mean_nearest_squared_distance(vocabulary, sets, max_rows=20_000, seed=0):
    """Mean squared distance of (up to ``max_rows``, sampled image by image with
    :func:`sample_rows`, never a copy of every descriptor) descriptors to their nearest
    word: the natural scale sigma^2 of soft assignment, estimated at fit time."""
    from ..kernels.nearest import nearest_words

    X = vocabulary.project(sample_rows(sets, max_rows, seed))
    centers = vocabulary.centers_.astype(X.dtype, copy=False)
    distances = nearest_words(X, centers)[1]
    return max(float(np.mean(distances, dtype=np.float64)), np.finfo(np.float32).tiny)


def sample_rows(sets, max_rows, seed):
    """A uniform random sample of at most ``max_rows`` rows of the sets, drawn set by set.

    How many rows each set gives follows the multivariate hypergeometric law (what drawing
    ``max_rows`` rows from all of them pooled would give), then each set's rows are drawn
    by a generator seeded from ``(seed, set index)``. Only the sample is allocated: the
    sets are never concatenated (they may be the whole training set).

    Parameters
    ----------
    sets : list of (n_i, D) arrays
    max_rows : int
    seed : int >= 0

    Returns
    -------
    (min(max_rows, sum n_i), D) array, the sets' common dtype, rows in set order
    """
    lengths = np.array([len(s) for s in sets], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        raise ValueError("no descriptors in X to estimate the soft-assignment scale (alpha, sigma) from")
    # Stream tags 0-2 are DescriptorSampler's: with the vocabulary's seed, alpha's sample is
    # still drawn independently of the vocabulary's training sample (on which d_1 is small).
    if total <= max_rows:
        counts = lengths
    else:
        counts = np.random.default_rng([seed, 3]).multivariate_hypergeometric(lengths, max_rows)
    nonempty = [s for s in sets if len(s)]
    dtype = reduce(np.promote_types, [s.dtype for s in nonempty])
    out = np.empty((int(counts.sum()), nonempty[0].shape[1]), dtype=dtype)
    row = 0
    for index, (descriptors, count) in enumerate(zip(sets, counts.tolist())):
        if count < len(descriptors):
            rng = np.random.default_rng([seed, 4, index])
            descriptors = descriptors[np.sort(rng.choice(len(descriptors), count, replace=False))]
        out[row:row + count] = descriptors
        row += count
    return out
