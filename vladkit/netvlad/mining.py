r"""Hard-negative mining and the ranking losses of weakly supervised retrieval training.

:class:`HardNegativeMiner` keeps a cache of the vectors of every training item (refreshed
every ``refresh_every`` steps, computed with the model in eval mode and without
gradients) and, for each query, picks the closest positive :math:`p^*` and the k hardest
negatives among a random pool plus the query's previous hard negatives, as in the NetVLAD
paper. The losses take the vectors of the resulting tuples
:math:`(q, p^*, n_1, \dots, n_k)`, computed afresh with gradients:

- :func:`triplet_loss`, the paper's margin ranking loss on squared distances;
- :func:`contrastive_loss`, Radenović et al.'s;
- :func:`multi_similarity_loss`, Wang et al.'s.

References
----------
Arandjelović, Gronát, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly
supervised place recognition", CVPR 2016 (Section 4: the loss, the hard-negative cache).
Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018 (the contrastive loss; margin 0.7).
Wang, Han, Huang, Dong & Scott, "Multi-similarity loss with general pair weighting for
deep metric learning", CVPR 2019 (α = 2, β = 50, λ = 0.5 as in their code, ε = 0.1).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["HardNegativeMiner", "LOSSES", "contrastive_loss", "multi_similarity_loss", "triplet_loss"]

#: The losses :class:`HardNegativeMiner` computes.
LOSSES = ("triplet", "contrastive", "multi-similarity")

#: Default margins: the NetVLAD paper's 0.1 on squared distances; Radenović et al.'s 0.7
#: on distances.
_MARGINS = {"triplet": 0.1, "contrastive": 0.7, "multi-similarity": 0.1}


def _split(vectors):
    """(B, 2 + k, d) tuple vectors -> q (B, d), p (B, d), negatives (B, k, d)."""
    if vectors.ndim != 3 or vectors.shape[1] < 3:
        raise ValueError(f"expected (B, 2 + k, d) vectors of (query, positive, negatives...) tuples, "
                         f"got shape {tuple(vectors.shape)}")
    return vectors[:, 0], vectors[:, 1], vectors[:, 2:]


def triplet_loss(vectors, margin=0.1):
    r"""The NetVLAD paper's weakly supervised ranking loss, averaged over the tuples.

    .. math::

        L_q = \sum_{j=1}^{k} \max\bigl(0,\; d^2(q, p^*) + m - d^2(q, n_j)\bigr),
        \qquad d^2(a, b) = \lVert v_a - v_b \rVert^2

    (Arandjelović et al., CVPR 2016, Eq. 7: the best positive must be closer than every
    hard negative by the margin m, 0.1 for unit vectors). Returns :math:`\frac1B \sum_q L_q`.

    Parameters
    ----------
    vectors : tensor (B, 2 + k, d)
        Each row: the query, its positive p*, its k negatives.
    margin : float
    """
    q, p, negatives = _split(vectors)
    d2_positive = (p - q).square().sum(-1)                          # (B,)
    d2_negatives = (negatives - q[:, None]).square().sum(-1)        # (B, k)
    return F.relu(d2_positive[:, None] + margin - d2_negatives).sum(1).mean()


def contrastive_loss(vectors, margin=0.7):
    r"""Radenović et al.'s contrastive loss over each tuple's pairs, averaged over tuples.

    .. math::

        L_q = \tfrac12\, d(q, p^*)^2 + \tfrac12 \sum_{j=1}^{k} \max\bigl(0,\; \tau - d(q, n_j)\bigr)^2,
        \qquad d(a, b) = \lVert v_a - v_b \rVert

    with margin τ (0.7, their value for AlexNet; 0.75-0.85 for deeper networks): matching
    pairs are pulled together, non-matching ones pushed apart until τ. Returns
    :math:`\frac1B \sum_q L_q`. (Distances with an epsilon under the square root so the
    gradient is finite at d = 0.)
    """
    q, p, negatives = _split(vectors)
    d_negatives = ((negatives - q[:, None]).square().sum(-1) + 1e-12).sqrt()
    return (0.5 * (p - q).square().sum(-1) + 0.5 * F.relu(margin - d_negatives).square().sum(1)).mean()


def multi_similarity_loss(vectors, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    r"""Wang et al.'s multi-similarity loss with its pair mining, averaged over tuples.

    With :math:`S_{qx} = v_q^\top v_x` (cosine similarity of unit vectors), the positive
    :math:`P = \{p^*\}` and the negatives :math:`N = \{n_j\}` of a tuple, pairs are first
    mined: a negative is kept if :math:`S_{qn} + \epsilon > \min_{p \in P} S_{qp}`, a
    positive if :math:`S_{qp} - \epsilon < \max_{n \in N} S_{qn}`; then

    .. math::

        L_q = \frac{1}{\alpha} \log\Bigl[1 + \sum_{p \in P'} e^{-\alpha (S_{qp} - \lambda)}\Bigr]
            + \frac{1}{\beta} \log\Bigl[1 + \sum_{n \in N'} e^{\beta (S_{qn} - \lambda)}\Bigr]

    over the kept pairs P', N' (an empty set contributes 0), with α = 2, β = 50 (the
    paper), λ = ``base`` = 0.5 and ε = 0.1 (the authors' code). Returns
    :math:`\frac1B \sum_q L_q`. The mining is a mask, not a Python branch: the same graph
    for any values.
    """
    q, p, negatives = _split(vectors)
    s_positive = (q * p).sum(-1, keepdim=True)                      # (B, 1)
    s_negatives = (negatives * q[:, None]).sum(-1)                   # (B, k)
    hardest_negative = s_negatives.max(1, keepdim=True).values.detach()
    keep_negative = (s_negatives + epsilon > s_positive.detach()).to(s_negatives.dtype)
    keep_positive = (s_positive - epsilon < hardest_negative).to(s_positive.dtype)
    positive_term = torch.log1p((keep_positive * torch.exp(-alpha * (s_positive - base))).sum(1)) / alpha
    negative_term = torch.log1p((keep_negative * torch.exp(beta * (s_negatives - base))).sum(1)) / beta
    return (positive_term + negative_term).mean()


def _positive_int(name, value, allow_none=False):
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


class HardNegativeMiner:
    r"""Hard-negative mining from a cache of vectors, and the loss of the mined tuples.

    Arandjelović et al.'s scheme (CVPR 2016, Section 4; ``trainWeakly.m``): the vectors of
    all training items are computed with the current network and cached; for a query q
    with group g(q),

    - the positive is the closest item of its group (the paper's :math:`p^*`, "the best
      matching potential positive"):
      :math:`p^* = \arg\min_{p:\, g(p) = g(q),\, p \ne q} \lVert v_q - v_p \rVert^2`;
    - the negatives are the k = ``n_negatives`` closest, in the cache, among
      ``negative_pool`` items drawn at random from the other groups plus the k hard
      negatives the query had last time (remembered across refreshes);

    then the loss is computed on fresh vectors of the tuple :math:`(q, p^*, n_1..n_k)`
    (:meth:`loss_value`). The cache is stale between refreshes, which the paper accepts for
    speed; ``refresh_every`` steps bounds how stale.

    Parameters
    ----------
    n_negatives : int, default=10
    negative_pool : int, default=1000
    refresh_every : int or None, default=None
        Steps between cache refreshes (None: the trainer refreshes once per epoch).
    loss : {"triplet", "contrastive", "multi-similarity"}, default="triplet"
    margin : float or None
        The triplet loss's m (default 0.1) or the contrastive loss's τ (default 0.7); the
        multi-similarity loss's ε (default 0.1).
    random_state : int, default=0
        Seed of the negative pools.

    Attributes
    ----------
    vectors_ : ndarray (n, d) float32
        The cache.
    groups_ : ndarray (n,) of int
    hard_ : dict
        query index -> its last hard negatives.
    last_refresh_ : int
        The step of the last refresh.
    """

    def __init__(self, n_negatives=10, negative_pool=1000, refresh_every=None, loss="triplet", margin=None,
                 random_state=0):
        self.n_negatives = n_negatives
        self.negative_pool = negative_pool
        self.refresh_every = refresh_every
        self.loss = loss
        self.margin = margin
        self.random_state = random_state

    # ----------------------------------------------------------------- the cache

    def _check(self):
        _positive_int("n_negatives", self.n_negatives)
        _positive_int("negative_pool", self.negative_pool)
        _positive_int("refresh_every", self.refresh_every, allow_none=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def due(self, step):
        """Whether the cache must be refreshed before ``step`` (0-based): never refreshed,
        or ``refresh_every`` steps since the last refresh."""
        if not hasattr(self, "vectors_"):
            return True
        return self.refresh_every is not None and step - self.last_refresh_ >= self.refresh_every

    def refresh(self, vectors, groups, step=0):
        """Set the cache: (n, d) vectors (array or tensor) of the training items, their
        groups. The hard-negative memory is kept (indices into the same items)."""
        self._check()
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().to("cpu", torch.float32).numpy()
        vectors = np.asarray(vectors, dtype=np.float32)
        groups = np.asarray(groups).reshape(-1)
        if vectors.ndim != 2 or len(vectors) != len(groups):
            raise ValueError(f"expected (n, d) vectors and n groups, got {vectors.shape} and {groups.shape}")
        if not hasattr(self, "rng_"):
            self.rng_ = np.random.default_rng([int(self.random_state), 31])
            self.hard_ = {}
        self.vectors_, self.groups_ = vectors, groups
        self.squared_ = np.einsum("ij,ij->i", vectors, vectors)
        self.members_ = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
        self.last_refresh_ = int(step)
        return self

    def mine(self, queries):
        """The tuples of ``queries`` (item indices): an (B', 2 + k) int array of rows
        ``[q, p*, n_1, .., n_k]``, for the queries that have a positive and negatives
        (B' <= B); updates the hard-negative memory.

        When fewer than k negatives exist at all they are repeated (cycled) to fill the k.
        """
        if not hasattr(self, "vectors_"):
            raise RuntimeError("refresh the cache before mining (HardNegativeMiner.refresh)")
        k, pool = int(self.n_negatives), int(self.negative_pool)
        queries = np.asarray(queries, dtype=np.intp).reshape(-1)
        cache, groups, n = self.vectors_, self.groups_, len(self.vectors_)
        distances = self.squared_[queries, None] + self.squared_[None, :] - 2 * (cache[queries] @ cache.T)
        rows = []
        for row, q in enumerate(queries.tolist()):
            members = self.members_[groups[q]]
            positives = members[members != q]
            if len(positives) == 0 or len(members) == n:
                continue
            positive = positives[np.argmin(distances[row, positives])]
            # `pool` random items of other groups: draw among all (a few more than the
            # pool, to make up for those of q's group), then drop q's group.
            draw = self.rng_.choice(n, min(n, pool + len(members)), replace=False)
            draw = draw[groups[draw] != groups[q]][:pool]
            candidates = np.union1d(draw, self.hard_.get(q, draw[:0]))
            if len(candidates) < k:
                candidates = np.resize(candidates, k)
            nearest = candidates[np.argsort(distances[row, candidates], kind="stable")[:k]]
            self.hard_[q] = nearest
            rows.append(np.concatenate([[q, positive], nearest]))
        return np.asarray(rows, dtype=np.intp).reshape(-1, 2 + k)

    # ----------------------------------------------------------------- the loss

    def loss_value(self, vectors):
        """The configured loss of (B, 2 + k, d) tuple vectors (see the module's functions)."""
        self._check()
        margin = _MARGINS[self.loss] if self.margin is None else float(self.margin)
        if self.loss == "triplet":
            return triplet_loss(vectors, margin)
        if self.loss == "contrastive":
            return contrastive_loss(vectors, margin)
        return multi_similarity_loss(vectors, epsilon=margin)

    # ------------------------------------------------------- checkpoint state

    def state_dict(self):
        """What a resumed training needs: the cache, the memory, the generator's state."""
        if not hasattr(self, "vectors_"):
            return {}
        hard_keys = np.fromiter(self.hard_.keys(), dtype=np.intp, count=len(self.hard_))
        hard = (np.stack([self.hard_[q] for q in hard_keys.tolist()]) if len(hard_keys)
                else np.zeros((0, int(self.n_negatives)), np.intp))
        # Tensors and plain Python values only: the checkpoint then loads with
        # torch.load(weights_only=True), which runs no pickled code.
        return {"vectors": torch.from_numpy(self.vectors_.copy()),
                "groups": torch.from_numpy(np.asarray(self.groups_, np.int64).copy()),
                "last_refresh": self.last_refresh_, "hard_keys": torch.from_numpy(hard_keys.astype(np.int64)),
                "hard": torch.from_numpy(hard.astype(np.int64)), "rng": self.rng_.bit_generator.state}

    def load_state_dict(self, state):
        if not state:
            return self
        self.rng_ = np.random.default_rng()
        self.rng_.bit_generator.state = state["rng"]
        keys, hard = np.asarray(state["hard_keys"]), np.asarray(state["hard"])
        self.hard_ = {int(q): np.asarray(v, np.intp) for q, v in zip(keys, hard)}
        return self.refresh(np.asarray(state["vectors"]), np.asarray(state["groups"], np.intp), state["last_refresh"])
