"""Bag of Features: histograms of visual words (Sivic & Zisserman 2003; Csurka et al. 2004)."""

from __future__ import annotations

import os

import numpy as np

from ..kernels.accumulate import histogram_sparse
from ..kernels.soft import knn_weights
from ..kernels.nearest import nearest_words
from ..kernels.products import squared_norms
from .normalize import l1_normalize, l2_normalize, power_normalize
from ..vocabulary.kmeans import KMeansVocabulary
from ._base import (
    Accumulation,
    BaseEncoder,
    add_tasks,
    check_params,
    mean_nearest_squared_distance,
    split_tasks,
    work_dtype,
)

NORMS = ("l2", "l1", None)


class BoFEncoder(BaseEncoder):
    """Bag-of-Features histogram: how often each visual word occurs in the image.

    h_k = sum_i q_ik with q_ik one-hot on the nearest word ("hard"), or the kernel codebook
    weights exp(-||x_i - c_k||^2 / (2 sigma^2)) over the ``n_neighbors`` nearest words,
    normalised to sum 1 per descriptor ("soft"; van Gemert et al. 2010). Then, in order:

    1. ``tf_idf``: ``h_k *= idf_k = ln((1 + n) / (1 + df_k)) + 1``, with df_k the number of the n
       training images in which word k occurs (scikit-learn's smoothed idf), counted on
       all of each image's descriptors (:class:`vladkit.ImageEncoder` counts them in a
       streaming pass over the whole images, not on its descriptor sample);
    2. ``power``: h = h^power (0.5 then ``norm="l2"`` is the Hellinger / Bhattacharyya map);
    3. ``norm``: h / max(||h||, 1e-12) in L2 or L1.

    Parameters
    ----------
    n_clusters : int, default=1000
    vocabulary : None, str, path or KMeansVocabulary
        As for :class:`VLADEncoder`.
    assignment : {"hard", "soft"}, default="hard"
    n_neighbors : int, default=5
        Words per descriptor for "soft".
    sigma : float or None, default=None
        Kernel width for "soft"; None estimates sigma^2 at fit time as the mean squared
        distance of descriptors to their nearest word (``sigma_``).
    tf_idf : bool, default=False
    norm : {"l2", "l1", None}, default="l2"
    power : float or None, default=None
    max_descriptors, random_state, n_jobs
        As for :class:`VLADEncoder`.

    Attributes
    ----------
    vocabulary_, sigma_, idf_ (None without ``tf_idf``), n_features_out_
    """

    _vocabulary_class = KMeansVocabulary
    _size_param = "n_clusters"

    def __init__(self, n_clusters=1000, *, vocabulary=None, assignment="hard", n_neighbors=5,
                 sigma=None, tf_idf=False, norm="l2", power=None, max_descriptors=200_000,
                 random_state=None, n_jobs=None):
        self.n_clusters = n_clusters
        self.vocabulary = vocabulary
        self.assignment = assignment
        self.n_neighbors = n_neighbors
        self.sigma = sigma
        self.tf_idf = tf_idf
        self.norm = norm
        self.power = power
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_ints=("n_neighbors",), positive_or_none=("sigma", "power"),
                     choices={"assignment": ("hard", "soft"), "norm": NORMS})

    def _fit_encoding(self, sets):
        if self.assignment == "hard":
            self.sigma_ = None
        elif self.sigma is not None:
            self.sigma_ = float(self.sigma)
        else:
            self.sigma_ = float(np.sqrt(mean_nearest_squared_distance(self.vocabulary_, sets)))
        self.idf_ = None
        if self.tf_idf:
            accumulation = Accumulation(self, len(sets), work_dtype(sets))
            for image, descriptors in enumerate(sets):
                accumulation.add(image, descriptors)
            self._set_idf(self._document_frequency(accumulation), len(sets))

    def _document_frequency(self, accumulation):
        """(K,) int64: in how many of the images of ``accumulation`` (an
        :class:`Accumulation` of this encoder) each word occurs (hard) or has weight (soft).

        Sums over batches of images give the document frequencies of a dataset streamed
        batch by batch (see :meth:`_set_idf`).
        """
        accumulation.flush()
        return np.count_nonzero(accumulation.sums["counts"], axis=0)

    def _set_idf(self, document_frequency, n_images):
        """Set ``idf_`` from the number of images each word occurs in, out of ``n_images``.

        ``fit`` counts them on its X; :class:`vladkit.ImageEncoder` on whole images streamed
        under its memory budget (its encoder is fitted on a descriptor sample, on which
        words are rarer). Same counts, same ``idf_``.
        """
        document_frequency = np.asarray(document_frequency)
        if document_frequency.shape != (self.vocabulary_.n_words_,):
            raise ValueError(f"document_frequency must have shape ({self.vocabulary_.n_words_},), "
                             f"got {document_frequency.shape}")
        if n_images < 1 or document_frequency.min() < 0 or document_frequency.max() > n_images:
            raise ValueError(f"document frequencies must lie in [0, n_images={n_images}]")
        self.idf_ = np.log((1 + n_images) / (1 + document_frequency)) + 1

    def _fits_without_sample(self):
        """Whether ``fit`` learns nothing from its X but ``idf_``: the vocabulary is given
        trained (object or file) and ``sigma`` is not estimated. :class:`vladkit.ImageEncoder`
        then counts the document frequencies in its single pass over the images."""
        vocabulary = self.vocabulary
        trained = isinstance(vocabulary, (str, os.PathLike)) or hasattr(vocabulary, "descriptor_dim_")
        return trained and (self.assignment == "hard" or self.sigma is not None)

    def _start(self, n_images, dtype):
        centers = self.vocabulary_.centers_.astype(dtype)
        return {"centers": centers, "centers_sqnorm": squared_norms(centers),
                # the exact words, for the float64 ranking of soft assignment's neighbours
                "centers64": self.vocabulary_.centers_.astype(np.float64),
                "counts": np.zeros((n_images, self.vocabulary_.n_words_), dtype=np.float64)}

    def _add(self, X, segments, acc):
        if self.assignment == "hard":
            labels = nearest_words(X, acc["centers"], acc["centers_sqnorm"], with_distances=False)[0]
            neighbors, weights = labels[:, None], np.ones((len(X), 1), dtype=np.float64)
        else:
            alpha = 0.5 / self.sigma_**2
            neighbors, weights = knn_weights(X, acc["centers"], self.n_neighbors, alpha, acc["centers_sqnorm"],
                                             acc["centers64"])
        tasks = split_tasks(segments)
        task_counts = np.zeros((len(tasks), acc["counts"].shape[1]), dtype=np.float64)
        histogram_sparse(neighbors, weights, tasks, task_counts)
        add_tasks(acc["counts"], tasks, task_counts)

    def _finish(self, acc, counts):
        histograms = acc["counts"]
        if self.idf_ is not None:
            histograms *= self.idf_
        if self.power is not None:
            power_normalize(histograms, self.power)
        if self.norm == "l2":
            l2_normalize(histograms)
        elif self.norm == "l1":
            l1_normalize(histograms)
        return histograms

    def _feature_names(self):
        return [f"bof_w{k}" for k in range(self.vocabulary_.n_words_)]

