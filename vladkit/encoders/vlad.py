"""VLAD: Vector of Locally Aggregated Descriptors (Jegou et al. 2010), hard, multiple and
NetVLAD-style soft assignment, with VLFeat's normalisations."""

from __future__ import annotations

import math

import numpy as np
from sklearn.utils import check_random_state

from ..kernels.encoding import vlad_hard
from ..kernels.accumulate import accumulate_sparse, task_products
from ..kernels.products import block_rows, squared_norms
from ..kernels.soft import knn_weights, softmax_weights
from ..kernels.nearest import nearest_constants, nearest_words, two_nearest_squared_distances
from .normalize import intra_normalize, l2_normalize, power_normalize
from ..vocabulary.kmeans import KMeansVocabulary
from ._base import BaseEncoder, add_tasks, check_params, sample_rows, split_tasks

ASSIGNMENTS = ("hard", "knn", "soft")
#: How ``fit`` sets alpha_ when ``alpha`` is a string; None means DEFAULT_ALPHA.
ALPHA_RULES = ("netvlad", "sigma")
DEFAULT_ALPHA = "netvlad"
#: Descriptors (at most) the alpha rules are estimated from: a mean over 20,000 rows is
#: within ~1% of the full mean, and the sample costs 20,000 x D values whatever X's size.
ALPHA_SAMPLE_ROWS = 20_000
#: NetVLAD's target ratio of the nearest word's weight to the second nearest's: 100.
_NETVLAD_RATIO = 100.0


class VLADEncoder(BaseEncoder):
    """VLAD encoding: per visual word, the sum of residuals of the descriptors assigned to it.

    With assignment weights q_ik (one-hot for hard assignment) and words c_k (VLFeat's
    ``vl_vlad_encode``, whose results this matches element for element):

    1. v_k = sum_i q_ik (x_i - c_k)   [with ``normalize_mass``: v_k = sum_i q_ik x_i / m_k - c_k,
       m_k = sum_i q_ik; a word with m_k = 0 keeps v_k = 0]
    2. ``power``: ``v = sign(v) |v|^power`` (0.5: signed square root)
    3. ``intra_norm``: ``v_k = v_k / max(||v_k||, 1e-12)`` per word (Arandjelovic & Zisserman 2013)
    4. ``l2``: ``v = v / max(||v||, 1e-12)``

    The output is [v_1, ..., v_K], K * D values (D after the vocabulary's PCA, if any).

    Parameters
    ----------
    n_clusters : int, default=64
        Size K of the vocabulary trained by ``fit`` when ``vocabulary`` is None.
    vocabulary : None, str, path or KMeansVocabulary
        A vocabulary file, a fitted vocabulary (used as is) or an unfitted one (a copy is
        fitted on X); None trains ``KMeansVocabulary(n_clusters)`` on X.
    assignment : {"hard", "knn", "soft"}, default="hard"
        "hard": the nearest word. "knn": Jegou et al.'s multiple assignment, the
        ``n_neighbors`` nearest words with weights exp(-alpha ||x - c_k||^2) normalised to
        sum 1. "soft": NetVLAD's softmax_k(-alpha ||x - c_k||^2) over all words
        (Arandjelovic et al. 2016).
    n_neighbors : int, default=5
        Words per descriptor for "knn".
    alpha : float, {"netvlad", "sigma"} or None, default=None
        Sharpness of "knn" and "soft" (ignored by "hard"). A number is used as is; a rule
        is estimated at fit time on a sample of the training descriptors (``alpha_``),
        d_1, d_2 being a descriptor's distances to its nearest and second-nearest word:

        - "netvlad" (what None means): alpha = -log(0.01) / mean(d_2^2 - d_1^2), the
          initialisation of NetVLAD's soft assignment (Arandjelovic et al., "NetVLAD: CNN
          architecture for weakly supervised place recognition", CVPR 2016; the "v2"
          initialisation of their code): the nearest word weighs on average 100 times the
          second nearest. It adapts to how far apart the words are, not only to how far
          descriptors lie from them.
        - "sigma": alpha = 1 / (2 sigma^2), sigma^2 = mean(d_1^2) (Jegou et al.'s multiple
          assignment scale; the default before "netvlad"). On dense RootSIFT it is ~15
          times smaller: "soft" spreads each descriptor over many words and loses 11 points
          of 15-Scene accuracy (64.6% against 75.8% at K=64). "knn", cut to the nearest
          words, depends less on alpha: "netvlad" is ahead on accuracy and near-duplicate
          retrieval, "sigma" by 0.015 mAP on 15-Scene retrieval
          (benchmarks/results/soft_alpha.md).

        The sample: at most 20,000 descriptors drawn uniformly from all of X's, image by
        image (no copy of X), reproducible for a given ``random_state`` (None: a fixed
        sample).
    normalize_mass : bool, default=False
    power : float or None, default=0.5
    intra_norm : bool, default=True
    l2 : bool, default=True
    max_descriptors, random_state
        For the vocabulary ``fit`` trains; ``random_state`` also draws alpha's sample.
    n_jobs : int or None
        Threads for BLAS and the aggregation (None: all cores).

    Attributes
    ----------
    vocabulary_ : KMeansVocabulary
    alpha_ : float or None
        The sharpness used ("knn", "soft"); None for "hard".
    n_features_out_ : int
    """

    _vocabulary_class = KMeansVocabulary
    _size_param = "n_clusters"

    def __init__(self, n_clusters=64, *, vocabulary=None, assignment="hard", n_neighbors=5,
                 alpha=None, normalize_mass=False, power=0.5, intra_norm=True, l2=True,
                 max_descriptors=200_000, random_state=None, n_jobs=None):
        self.n_clusters = n_clusters
        self.vocabulary = vocabulary
        self.assignment = assignment
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.normalize_mass = normalize_mass
        self.power = power
        self.intra_norm = intra_norm
        self.l2 = l2
        self.max_descriptors = max_descriptors
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _validate_params(self):
        check_params(self, positive_ints=("n_neighbors",), positive_or_none=("power",),
                     choices={"assignment": ASSIGNMENTS})
        alpha = self.alpha
        if isinstance(alpha, str):
            valid = alpha in ALPHA_RULES
        else:
            valid = alpha is None or (isinstance(alpha, (int, float, np.integer, np.floating))
                                      and not isinstance(alpha, bool) and np.isfinite(alpha) and alpha > 0)
        if not valid:
            raise ValueError(
                f"alpha must be a positive number, one of {ALPHA_RULES} (a rule estimated at "
                f"fit time) or None (the default rule, {DEFAULT_ALPHA!r}), got {alpha!r}"
            )

    def _fit_encoding(self, sets):
        if self.assignment == "hard":
            self.alpha_ = None
        elif self.alpha is not None and not isinstance(self.alpha, str):
            self.alpha_ = float(self.alpha)
        else:
            rule = self.alpha or DEFAULT_ALPHA
            self.alpha_ = estimate_alpha(self.vocabulary_, self._alpha_sample(sets), rule)

    def _alpha_sample(self, sets):
        """The training descriptors the alpha rules are estimated from (see ``alpha``)."""
        # None gives a fixed sample, not a random one: alpha_ (and so every vector) then
        # stays the same from one fit to the next on the same data and vocabulary.
        if self.random_state is None:
            seed = 0
        else:
            seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        return sample_rows(sets, ALPHA_SAMPLE_ROWS, seed)

    def _start(self, n_images, dtype):
        vocabulary = self.vocabulary_
        centers = vocabulary.centers_.astype(dtype)
        return {
            "centers": centers,
            "centers_sqnorm": squared_norms(centers),
            # the exact words, for the float64 ranking of the nearest ("knn")
            "centers64": vocabulary.centers_.astype(np.float64),
            "centers_t": np.ascontiguousarray(centers.T),
            "constants": nearest_constants(dtype, vocabulary.centers_.astype(np.float64)),
            # Sums in float64 whatever the input: each term is rounded as the input is, but
            # the total no longer depends on the order of addition, so an image encoded
            # whole, in pieces or in another batch gives the same vector.
            "residuals": np.zeros((n_images, vocabulary.n_words_, vocabulary.dim_), dtype=np.float64),
            "mass": np.zeros((n_images, vocabulary.n_words_), dtype=np.float64),
        }

    def _add(self, X, segments, acc):
        centers, residuals, mass = acc["centers"], acc["residuals"], acc["mass"]
        if self.assignment in ("hard", "knn"):
            tasks = split_tasks(segments)
            task_residuals = np.zeros((len(tasks),) + residuals.shape[1:], dtype=residuals.dtype)
            task_mass = np.zeros((len(tasks), mass.shape[1]), dtype=mass.dtype)
            if self.assignment == "hard":
                vlad_hard(X, centers, acc["centers_t"], acc["centers_sqnorm"], acc["centers64"], acc["constants"],
                          tasks, block_rows(len(centers)), task_residuals, task_mass)
            else:
                neighbors, weights = knn_weights(X, centers, self.n_neighbors, self.alpha_, acc["centers_sqnorm"],
                                             acc["centers64"])
                accumulate_sparse(X, neighbors, weights, centers, tasks, task_residuals, task_mass)
            add_tasks(residuals, tasks, task_residuals)
            add_tasks(mass, tasks, task_mass)
        else:
            # Dense weights: W^T [X, max|x|, 1] per task, in float64 (exact_soft_residuals).
            weights = softmax_weights(X, centers, self.alpha_, acc["centers_sqnorm"]).astype(np.float64)
            x = X.astype(np.float64)
            centers64 = centers.astype(np.float64)
            tasks = split_tasks(segments)
            sums = np.zeros((len(tasks), len(centers), x.shape[1] + 2))
            task_products(weights, np.column_stack([x, np.abs(x).max(axis=1), np.ones(len(x))]), tasks, sums)
            for j, (image, start, end) in enumerate(segments.tolist()):
                mine = (tasks[:, 0] == image) & (tasks[:, 1] >= start) & (tasks[:, 2] <= end)
                total = sums[mine].sum(axis=0)
                residuals[image] += exact_soft_residuals(weights[start:end], x[start:end], centers64, total[:, -1],
                                                         total[:, :-2], total[:, -2])
                mass[image] += total[:, -1]

    def _finish(self, acc, counts):
        return aggregate_residuals(acc["residuals"], acc["mass"], self.normalize_mass,
                                   self.power, self.intra_norm, self.l2)

    def _feature_names(self):
        return self._word_dim_names("vlad")


def estimate_alpha(vocabulary, sample, rule):
    """Soft-assignment sharpness from a descriptor sample, by ``rule``.

    With d_1, d_2 the distances of a descriptor to its nearest and second-nearest word
    (after the vocabulary's PCA):

    - "netvlad": alpha = -log(0.01) / mean(d_2^2 - d_1^2) (NetVLAD's initialisation,
      Arandjelovic et al. 2016: softmax_k(-alpha ||x - c_k||^2) then weighs the nearest
      word 100 times the second nearest on average);
    - "sigma": alpha = 1 / (2 sigma^2), sigma^2 = mean(d_1^2).

    A vocabulary of one word has no d_2 (every alpha gives it the same weights), and a
    sample with d_2 = d_1 everywhere gives no gap: "netvlad" then falls back on "sigma".
    """
    if rule not in ALPHA_RULES:
        raise ValueError(f"rule must be one of {ALPHA_RULES}, got {rule!r}")
    centers = vocabulary.centers_.astype(np.float64)
    centers_sqnorm = squared_norms(centers)
    nearest, gap = 0.0, 0.0
    # float64 blocks: the gap d_2^2 - d_1^2 is a difference of two large distances.
    for start in range(0, len(sample), 4096):
        X = vocabulary.project(sample[start:start + 4096].astype(np.float64))
        if rule == "netvlad" and len(centers) >= 2:
            distances = two_nearest_squared_distances(X, centers, centers_sqnorm)
            nearest += float(np.sum(distances[:, 0]))
            gap += float(np.sum(distances[:, 1] - distances[:, 0]))
        else:
            nearest += float(np.sum(nearest_words(X, centers, centers_sqnorm)[1]))
    if gap > 0:
        return math.log(_NETVLAD_RATIO) * len(sample) / gap
    # sigma^2 = 0 (every descriptor on a word): floored at the smallest float32, which
    # makes the assignment hard.
    return 0.5 / max(nearest / len(sample), np.finfo(np.float32).tiny)


#: A word's BLAS residual is recomputed term by term when it is not this many times
#: larger than the round-off bound of its two products (about 1e-8 relative precision).
_CANCELLATION_MARGIN = 1e8


def exact_soft_residuals(w, x, centers, mass, weighted=None, weighted_sizes=None):
    """sum_i w_ik (x_i - c_k) for every word k, (K, D), float64.

    Two BLAS products, W^T X - (W^T 1) c, except for the words where they cancel: when
    descriptors sit on a word (or its weight is tiny next to its descriptors' size) the
    difference drowns in round-off of order eps * sum_i w_ik |x_i|, which intra-
    normalisation would scale up to a whole block. Those words (rare) are recomputed from
    the residuals x_i - c_k themselves. ``weighted`` = W^T X and ``weighted_sizes`` =
    W^T max_d |x_d|, when the caller has them (computed here otherwise).
    """
    if weighted is None:
        weighted, weighted_sizes = w.T @ x, w.T @ np.abs(x).max(axis=1)
    residuals = weighted - mass[:, None] * centers
    eps = np.finfo(np.float64).eps
    bound = eps * (weighted_sizes + mass * np.abs(centers).max(axis=1)) * x.shape[1]
    for k in np.flatnonzero(np.abs(residuals).max(axis=1) <= _CANCELLATION_MARGIN * bound):
        residuals[k] = w[:, k] @ (x - centers[k])
    return residuals


def aggregate_residuals(residuals, mass, normalize_mass, power, intra_norm, l2):
    """VLAD steps 1-4 from the per-word residual sums r_k = sum_i q_ik (x_i - c_k) and
    masses m_k (with ``normalize_mass``, v_k = r_k / m_k = sum_i q_ik x_i / m_k - c_k).

    residuals : (n, K, D), modified in place; mass : (n, K). Returns (n, K * D).
    """
    n, n_words, dim = residuals.shape
    assigned = mass > 0
    if normalize_mass:
        residuals /= np.where(assigned, mass, 1.0)[:, :, None].astype(residuals.dtype)
    residuals[~assigned] = 0  # VLFeat: a word with no mass keeps a zero block (not -c_k)
    vectors = residuals.reshape(n, n_words * dim)
    if power is not None:
        power_normalize(vectors, power)
    if intra_norm:
        intra_normalize(vectors, n_words)
    if l2:
        l2_normalize(vectors)
    return vectors
