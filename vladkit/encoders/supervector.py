"""Super-vector coding (Zhou, Yu, Zhang & Huang 2010)."""

from __future__ import annotations

import numpy as np

from ..kernels.accumulate import accumulate_hard, accumulate_sparse
from ..kernels.soft import knn_weights
from ..kernels.nearest import nearest_words
from ..kernels.products import squared_norms
from .normalize import l2_normalize
from ..vocabulary.kmeans import KMeansVocabulary
from ._base import BaseEncoder, add_tasks, check_params, mean_nearest_squared_distance, split_tasks

ASSIGNMENTS = ("hard", "soft")


class SuperVectorEncoder(BaseEncoder):
    """Super-vector coding: per visual word, its share of the descriptors and their mean
    offset from the word.

    Zhou, Yu, Zhang & Huang, "Image Classification using Super-Vector Coding of Local
    Image Descriptors", ECCV 2010. A descriptor x with assignment weights q_k(x) (one-hot
    on the nearest word for ``assignment="hard"``, their vector quantisation) is coded
    as phi(x) = [s q_k(x), q_k(x) (x - mu_k)]_{k=1..K}, and an image's N descriptors
    are pooled word by word as Phi_k = 1/N p_k^-1/2 sum_i phi_k(x_i), p_k = n_k / N,
    with n_k = sum_i q_ik (the number of descriptors of word k when hard), i.e.

        block_k = sqrt(n_k / N) [s, sum_i q_ik (x_i - mu_k) / n_k]      (D + 1 values)

    a word with n_k = 0 keeps a zero block. Then ``l2``: v / max(||v||, 1e-12). The
    output is [block_1, ..., block_K], K * (D + 1) values (D after the vocabulary's PCA,
    if any): in each block the constant term first, then the D mean offsets.

    ``n_k`` and the residual sums are sums over descriptors, so images can be streamed in
    pieces and batches (see :class:`vladkit.encoders._base.Accumulation`).

    Parameters
    ----------
    n_clusters : int, default=64
        Size K of the vocabulary trained by ``fit`` when ``vocabulary`` is None (as
        :class:`VLADEncoder`, whose vectors are about as long, K * D).
    vocabulary : None, str, path or KMeansVocabulary
        As for :class:`VLADEncoder`.
    s : float >= 0, default=1.0
        Weight of the constant (zero-order) term against the mean offsets: Zhou et al.'s
        non-negative constant s. The s terms alone, s sqrt(n_k / N), are the Hellinger
        (square-rooted) BoF histogram; s = 0 drops them (the blocks are then
        mass-normalised VLAD weighted by sqrt(n_k / N)). The paper leaves s free, a
        trade-off that depends on the descriptors' scale; 1.0 is not taken from their
        experiments. Measured on dense RootSIFT (unit norm) from 15-Scene, a word's
        mean offset is ~0.1 long at K = 64 and ~0.27 at K = 1024, so with s = 1 the s
        terms hold 97-99% of the squared norm: smaller values (~0.1-0.3) balance the two
        parts there, while raw SIFT (norm ~512) would need far larger ones. Tune it for
        your descriptors.
    assignment : {"hard", "soft"}, default="hard"
        "hard": the nearest word (Zhou et al.). "soft": the kernel codebook weights
        exp(-||x - mu_k||^2 / (2 sigma^2)) over the ``n_neighbors`` nearest words,
        normalised to sum 1 per descriptor, as :class:`BoFEncoder`'s "soft".
    n_neighbors : int, default=5
        Words per descriptor for "soft".
    sigma : float or None, default=None
        Kernel width for "soft"; None estimates sigma^2 at fit time as the mean squared
        distance of descriptors to their nearest word (``sigma_``), as BoFEncoder.
    l2 : bool, default=True
    max_descriptors, random_state, n_jobs
        As for :class:`VLADEncoder`.

    Attributes
    ----------
    vocabulary_ : KMeansVocabulary
    sigma_ : float or None
        The kernel width used ("soft"); None for "hard".
    n_features_out_ : int, K * (D + 1)
    """

    _vocabulary_class = KMeansVocabulary
    _size_param = "n_clusters"

    def __init__(self, n_clusters=64, *, vocabulary=None, s=1.0, assignment="hard", n_neighbors=5,
                 sigma=None, l2=True, max_descriptors=200_000, random_state=None, n_jobs=None):
        self.n_clusters = n_clusters
        self.vocabulary = vocabulary
        self.s = s
        self.assignment = assignment
        self.n_neighbors = n_neighbors
        self.sigma = sigma
        self.l2 = l2
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_ints=("n_neighbors",), positive_or_none=("sigma",),
                     choices={"assignment": ASSIGNMENTS})
        s = self.s
        if not (isinstance(s, (int, float, np.integer, np.floating)) and not isinstance(s, bool)
                and np.isfinite(s) and s >= 0):
            raise ValueError(f"s must be a non-negative number, got {s!r}")

    def _fit_encoding(self, sets):
        if self.assignment == "hard":
            self.sigma_ = None
        elif self.sigma is not None:
            self.sigma_ = float(self.sigma)
        else:
            self.sigma_ = float(np.sqrt(mean_nearest_squared_distance(self.vocabulary_, sets)))

    def _start(self, n_images, dtype):
        vocabulary = self.vocabulary_
        centers = vocabulary.centers_.astype(dtype)
        return {
            "centers": centers,
            "centers_sqnorm": squared_norms(centers),
            # the exact words, for the float64 ranking of the nearest ("soft")
            "centers64": vocabulary.centers_.astype(np.float64),
            # float64 sums, as VLADEncoder's: the same vector whatever the order of addition
            "residuals": np.zeros((n_images, vocabulary.n_words_, vocabulary.dim_), dtype=np.float64),
            "mass": np.zeros((n_images, vocabulary.n_words_), dtype=np.float64),
        }

    def _add(self, X, segments, acc):
        centers, residuals, mass = acc["centers"], acc["residuals"], acc["mass"]
        tasks = split_tasks(segments)
        task_residuals = np.zeros((len(tasks),) + residuals.shape[1:], dtype=residuals.dtype)
        task_mass = np.zeros((len(tasks), mass.shape[1]), dtype=mass.dtype)
        if self.assignment == "hard":
            labels = nearest_words(X, centers, acc["centers_sqnorm"], with_distances=False)[0]
            accumulate_hard(X, labels, centers, tasks, task_residuals, task_mass)
        else:
            alpha = 0.5 / self.sigma_**2
            neighbors, weights = knn_weights(X, centers, self.n_neighbors, alpha, acc["centers_sqnorm"],
                                             acc["centers64"])
            accumulate_sparse(X, neighbors, weights, centers, tasks, task_residuals, task_mass)
        add_tasks(residuals, tasks, task_residuals)
        add_tasks(mass, tasks, task_mass)

    def _finish(self, acc, counts):
        residuals, mass = acc["residuals"], acc["mass"]
        n, n_words, dim = residuals.shape
        blocks = np.zeros((n, n_words, dim + 1))
        total = counts.astype(np.float64)[:, None]  # N: every descriptor's weights sum to 1
        coded = mass > 0
        # sqrt(n_k / N) s and sqrt(n_k / N) r_k / n_k = r_k / sqrt(n_k N)
        share = np.sqrt(np.divide(mass, total, out=np.zeros_like(mass), where=coded))
        blocks[:, :, 0] = self.s * share
        root = np.sqrt(mass * total, where=coded, out=np.ones_like(mass))
        blocks[:, :, 1:] = np.where(coded[:, :, None], residuals / root[:, :, None], 0.0)
        vectors = blocks.reshape(n, n_words * (dim + 1))
        if self.l2:
            l2_normalize(vectors)
        return vectors

    def _feature_names(self):
        vocabulary = self.vocabulary_
        return [name for k in range(vocabulary.n_words_)
                for name in [f"sv_w{k}_s"] + [f"sv_w{k}_d{d}" for d in range(vocabulary.dim_)]]
