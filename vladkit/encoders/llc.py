"""LLC: locality-constrained linear coding with max pooling (Wang et al. 2010)."""

from __future__ import annotations

import numpy as np

from ..kernels.nearest import candidate_count, exact_nearest, nearest_k_words
from ..kernels.soft import llc_codes
from ..kernels.accumulate import max_pool_sparse, sum_pool_sparse
from ..kernels.products import squared_norms
from .normalize import l2_normalize
from ..vocabulary.kmeans import KMeansVocabulary
from ._base import BaseEncoder, add_tasks, check_params, max_tasks, split_tasks

POOLINGS = ("max", "sum")


class LLCEncoder(BaseEncoder):
    """Locality-constrained linear coding: each descriptor is reconstructed from its few
    nearest words, and the codes are max-pooled over the image.

    Wang, Yang, Yu, Lv, Huang & Gong, "Locality-constrained Linear Coding for Image
    Classification", CVPR 2010, with the approximated LLC of their code
    (``LLC_coding_appr.m``, ``LLC_pooling.m``). For each descriptor x_i, with B_i the k
    (``n_neighbors``) words nearest x_i:

    1. z = B_i - 1 x_i^T (k x D), C = z z^T + beta tr(z z^T) I (``beta``: the
       regularisation that keeps C invertible when k > D or words are collinear);
    2. w = C^-1 1 / (1^T C^-1 1): the weights of the affine combination of B_i nearest
       x_i, sum_j w_j = 1 (they may be negative: x_i outside its words' hull);
    3. the code u_i (K values) holds w at the k words of B_i and 0 elsewhere.

    Then, over the image's N descriptors:

    4. ``pooling="max"``: v_k = max_i u_ik (Wang et al.; the maximum includes the zeros
       of the descriptors that do not code word k, so v_k < 0 only when every descriptor
       codes k with a negative weight); ``"sum"``: v_k = sum_i u_ik;
    5. ``l2``: v = v / max(||v||, 1e-12).

    An image (or a spatial-pyramid cell) without descriptors gives zeros. Max pooling is
    not a sum, but it is associative: images are streamed and split across chunks
    exactly as for the other encoders (the running maximum, and how many of the image's
    descriptors code each word, are kept).

    Spatial pyramids: :class:`SpatialPyramid` encodes each cell as an image, so the
    codes are max-pooled per cell. Wang et al. concatenate the cells' pooled codes
    (levels 1x1, 2x2, 4x4) and L2-normalise once, i.e.
    ``SpatialPyramid(LLCEncoder(l2=False), levels=((1, 1), (2, 2), (4, 4)))``; with the
    default ``l2=True`` each cell is normalised first, as the pyramid does for every
    other encoder.

    Parameters
    ----------
    n_clusters : int, default=1024
        Size K of the vocabulary trained by ``fit`` when ``vocabulary`` is None (Wang et
        al. use codebooks of thousands of words on dense SIFT).
    vocabulary : None, str, path or KMeansVocabulary
        As for :class:`VLADEncoder`.
    n_neighbors : int, default=5
        Words k per descriptor (Wang et al.'s default, also their experiments'); at most K.
    beta : float, default=1e-4
        Regularisation of C (their code's default).
    pooling : {"max", "sum"}, default="max"
    l2 : bool, default=True
    max_descriptors, random_state, n_jobs
        As for :class:`VLADEncoder`.

    Attributes
    ----------
    vocabulary_ : KMeansVocabulary
    n_features_out_ : int, K

    Notes
    -----
    The nearest words are found with BLAS matrix products in the descriptors' dtype,
    keeping ``n_neighbors + 4`` candidates, which are ranked again in float64: a word
    swapped on a near tie would change the code discontinuously. The k x k systems are
    solved in float64 (C's condition number reaches ~1 / beta).
    """

    _vocabulary_class = KMeansVocabulary
    _size_param = "n_clusters"

    def __init__(self, n_clusters=1024, *, vocabulary=None, n_neighbors=5, beta=1e-4, pooling="max",
                 l2=True, max_descriptors=200_000, random_state=None, n_jobs=None):
        self.n_clusters = n_clusters
        self.vocabulary = vocabulary
        self.n_neighbors = n_neighbors
        self.beta = beta
        self.pooling = pooling
        self.l2 = l2
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_ints=("n_neighbors",), choices={"pooling": POOLINGS})
        beta = self.beta
        if not (isinstance(beta, (int, float, np.integer, np.floating)) and not isinstance(beta, bool)
                and np.isfinite(beta) and beta > 0):
            # beta = 0 leaves C singular whenever k > D or the words are collinear
            raise ValueError(f"beta must be a positive number, got {beta!r}")

    def _start(self, n_images, dtype):
        vocabulary = self.vocabulary_
        centers = vocabulary.centers_.astype(dtype)
        acc = {"centers": centers, "centers_sqnorm": squared_norms(centers),
               # the exact words, for the float64 ranking and codes
               "centers64": vocabulary.centers_.astype(np.float64)}
        n_words = vocabulary.n_words_
        if self.pooling == "max":
            # -inf: no descriptor has coded the word yet (an image without any ends as 0)
            acc["maxima"] = np.full((n_images, n_words), -np.inf)
            acc["hits"] = np.zeros((n_images, n_words), dtype=np.int64)
        else:
            acc["sums"] = np.zeros((n_images, n_words))
        return acc

    def _codes(self, X, acc):
        """(neighbors (n, k) int64, weights (n, k) float64): each row's LLC code."""
        n_words = acc["centers"].shape[0]
        k = min(self.n_neighbors, n_words)
        candidates = nearest_k_words(X, acc["centers"], candidate_count(k, n_words), acc["centers_sqnorm"])
        neighbors = np.empty((len(X), k), dtype=np.int64)
        exact_nearest(X, acc["centers64"], candidates, neighbors, np.empty((len(X), k)))
        weights = np.empty((len(X), k), dtype=np.float64)
        llc_codes(X, acc["centers64"], neighbors, float(self.beta), weights)
        return neighbors, weights

    def _add(self, X, segments, acc):
        neighbors, weights = self._codes(X, acc)
        tasks = split_tasks(segments)
        n_words = acc["centers"].shape[0]
        if self.pooling == "max":
            task_maxima = np.full((len(tasks), n_words), -np.inf)
            task_hits = np.zeros((len(tasks), n_words), dtype=np.int64)
            max_pool_sparse(neighbors, weights, tasks, task_maxima, task_hits)
            max_tasks(acc["maxima"], tasks, task_maxima)
            add_tasks(acc["hits"], tasks, task_hits)
        else:
            task_sums = np.zeros((len(tasks), n_words))
            sum_pool_sparse(neighbors, weights, tasks, task_sums)
            add_tasks(acc["sums"], tasks, task_sums)

    def _finish(self, acc, counts):
        if self.pooling == "max":
            maxima, hits = acc["maxima"], acc["hits"]
            # A descriptor that does not code word k contributes u_ik = 0 to its maximum.
            uncoded_by_some = hits < counts[:, None]
            vectors = np.where(uncoded_by_some, np.maximum(maxima, 0.0), maxima)
            vectors[hits == 0] = 0.0  # (also every word of an image without descriptors)
        else:
            vectors = acc["sums"]
        if self.l2:
            l2_normalize(vectors)
        return vectors

    def _feature_names(self):
        return [f"llc_w{k}" for k in range(self.vocabulary_.n_words_)]
