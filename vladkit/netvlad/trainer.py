"""The machinery of one NetVLAD training run (see :func:`vladkit.netvlad.training.train_netvlad`):
deterministic torch, padded batches of random descriptor subsets, the epoch loop of each
loss (:class:`_Trainer`) with its hard-negative mining, and the validation mAP."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn import functional as F

from ..retrieval.metrics import mean_average_precision
from .layer import INPUT_EPS


@contextlib.contextmanager
def _deterministic_torch(seed, n_threads):
    """Seeded, deterministic torch on the CPU with a fixed number of threads; the caller's
    global settings (generator, deterministic flag, threads) are restored on exit."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(n_threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn)
            torch.set_num_threads(previous_threads)


class _Batches:
    """Padded (B, N, D) float32 batches of random descriptor subsets, with their masks
    (None when no row is padding).

    With ``normalize`` the rows are input-normalised here, x / sqrt(sum(x^2) + 1e-12) as
    the layer would (its INPUT_EPS), and the layer runs with ``normalize_input`` off (see
    :class:`_Trainer`): the descriptors are frozen, so this saves the layer an
    elementwise pass over (B, N, D) and its bookkeeping at every step."""

    def __init__(self, sets, dim, per_set, normalize):
        self.sets, self.dim, self.per_set, self.normalize = sets, dim, per_set, normalize

    def rows(self, index, rng):
        X = self.sets[index]
        if len(X) > self.per_set:
            X = X[np.sort(rng.choice(len(X), self.per_set, replace=False))]
        return X

    def __call__(self, indices, rng=None, fixed=None):
        """``fixed``: a list of row arrays already drawn (validation), else drawn with rng."""
        parts = fixed if fixed is not None else [self.rows(i, rng) for i in indices]
        width = max(1, max(len(p) for p in parts))
        x = np.zeros((len(parts), width, self.dim), dtype=np.float32)
        mask = np.zeros((len(parts), width), dtype=bool)
        for j, part in enumerate(parts):
            x[j, :len(part)] = part
            mask[j, :len(part)] = True
        if self.normalize:
            x /= np.sqrt(np.einsum("bnd,bnd->bn", x, x) + INPUT_EPS)[..., None]
        return torch.from_numpy(x), (None if mask.all() else torch.from_numpy(mask))


def _encode(layer, batches, indices, rng=None, fixed=None, chunk=64):
    """Vectors of the sets ``indices`` (no gradient), float32 numpy."""
    out = np.empty((len(indices), layer.n_features_out), dtype=np.float32)
    with torch.no_grad():
        for first in range(0, len(indices), chunk):
            part = indices[first:first + chunk]
            x, mask = batches(part, rng, None if fixed is None else fixed[first:first + chunk])
            out[first:first + len(part)] = layer(x, mask).numpy()
    return out


def _retrieval_map(vectors, group_ids):
    """mAP of each set searching all the others by inner product (the squared distances'
    order for unit vectors), positives its group (:func:`vladkit.retrieval.metrics.mean_average_precision`,
    the Holidays/Oxford trapezoid AP). Sets alone in their group are not queries."""
    scores = vectors @ vectors.T
    rankings, truth = {}, {}
    for q in range(len(vectors)):
        positives = np.flatnonzero(group_ids == group_ids[q])
        if len(positives) < 2:
            continue
        rankings[q] = np.argsort(-scores[q], kind="stable").tolist()
        truth[q] = [int(p) for p in positives if p != q]
    return mean_average_precision(rankings, truth) if truth else float("nan")


class _Validation:
    """The validation mAP of the layer, on fixed random subsets of the validation sets
    (input-normalised here when ``normalize``: the trained layer runs without)."""

    def __init__(self, layer, sets, groups, dim, per_step, seed, normalize):
        self.layer, self.groups = layer, groups
        self.batches = _Batches(sets, dim, per_step, normalize)
        rng = np.random.default_rng([seed, 22])
        self.fixed = [self.batches.rows(i, rng) for i in range(len(sets))]

    def __call__(self):
        self.layer.eval()
        vectors = _encode(self.layer, self.batches, np.arange(len(self.fixed)), fixed=self.fixed)
        self.layer.train()
        return _retrieval_map(vectors, self.groups)


class _Trainer:
    """One training run's state: the layer, its optimiser, the classification head, the
    hard-negative memory, and the epoch loop of each loss.

    The layer's input normalisation is done on the batches (:class:`_Batches`), so the
    layer runs with ``normalize_input`` off until :meth:`finish` (and around callbacks)."""

    def __init__(self, layer, sets, groups, dim, *, loss, lr, head_lr, optimizer, weight_decay,
                 batch_size, per_step, margin, n_negatives, negative_pool, classification_weight, rng):
        self.layer, self.loss, self.rng = layer, loss, rng
        self.batch_size, self.margin = batch_size, margin
        self.n_negatives, self.negative_pool = n_negatives, negative_pool
        self.classification_weight = classification_weight
        self.normalize = layer.normalize_input
        self.batches = _Batches(sets, dim, per_step, self.normalize)
        layer.normalize_input = False
        layer.train()
        self.groups = groups
        self.members = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
        self.hard = {}  # query -> its hard negatives of the last epoch
        params = [{"params": list(layer.parameters()), "lr": lr}]
        self.head = None
        if "classification" in loss:
            _, labels = np.unique(groups, return_inverse=True)
            self.labels = torch.from_numpy(labels.astype(np.int64))
            self.head = torch.nn.Linear(layer.n_features_out, int(labels.max()) + 1)
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
            params.append({"params": list(self.head.parameters()), "lr": head_lr})
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, momentum=0.9, weight_decay=weight_decay)

    def epoch(self, n_queries, bar):
        """One pass: (mean loss, queries with a violated margin or None)."""
        total = count = active = 0
        if "triplet" in self.loss:  # the cache of vectors hard negatives are mined from
            self.layer.eval()
            self.cache = _encode(self.layer, self.batches, np.arange(len(self.groups)), self.rng)
            self.layer.train()
            self.squared = np.einsum("ij,ij->i", self.cache, self.cache)
        order = self.rng.permutation(len(self.groups))[:n_queries]
        for first in range(0, len(order), self.batch_size):
            queries = order[first:first + self.batch_size]
            if "triplet" in self.loss:
                value, violated = self._triplet(queries)
                active += violated
            else:
                x, mask = self.batches(queries, self.rng)
                value = F.cross_entropy(self.head(self.layer(x, mask)),
                                        self.labels[torch.from_numpy(queries)])
            if value is not None:
                self.optimizer.zero_grad(set_to_none=True)
                value.backward()
                self.optimizer.step()
                total += float(value.detach()) * len(queries)
                count += len(queries)
            bar.update(1)
        return (total / count if count else 0.0), (active if "triplet" in self.loss else None)

    def _triplet(self, queries):
        tuples = _mine(queries, self.cache, self.squared, self.members, self.groups, self.hard,
                       self.n_negatives, self.negative_pool, self.rng)
        if not tuples:
            return None, 0
        x, mask = self.batches(np.concatenate(tuples), self.rng)
        vectors = self.layer(x, mask).view(len(tuples), 2 + self.n_negatives, -1)
        d2 = (vectors[:, 1:] - vectors[:, :1]).square().sum(-1)       # (tuples, 1 + n)
        terms = F.relu(d2[:, :1] + self.margin - d2[:, 1:])
        value = terms.sum(1).mean()
        if self.head is not None:
            first = torch.from_numpy(np.array([t[0] for t in tuples]))
            value = value + self.classification_weight * F.cross_entropy(self.head(vectors[:, 0]),
                                                                         self.labels[first])
        return value, int((terms > 0).any(1).sum())

    def decay(self, factor):
        for group in self.optimizer.param_groups:
            group["lr"] *= factor

    def call_back(self, callback, epoch):
        self.layer.normalize_input = self.normalize  # the layer as the caller knows it
        try:
            callback(epoch, self.layer)
        finally:
            self.layer.normalize_input = False

    def finish(self):
        self.layer.normalize_input = self.normalize
        self.layer.eval()


def _state(layer):
    """A copy of the layer's state_dict (tensors cloned; the extra state, metadata, copied)."""
    import copy

    return {name: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for name, value in layer.state_dict().items()}


def _mine(queries, cache, squared, group_of, groups, hard, n_negatives, pool, rng):
    """[q, p*, n_1 .. n_n] (positions) for each query that has a positive and negatives,
    from the epoch's cache of vectors; updates the hard-negative memory ``hard``."""
    scores = cache[queries] @ cache.T                                   # (B, n)
    distances = squared[queries, None] + squared[None, :] - 2 * scores  # d^2 to every set
    n = len(cache)
    tuples = []
    for row, q in enumerate(queries.tolist()):
        members = group_of[groups[q]]
        positives = members[members != q]
        if len(positives) == 0 or len(members) == n:
            continue
        positive = positives[np.argmin(distances[row, positives])]
        # `pool` random negatives (drawn among all sets, then those of q's group dropped),
        # plus last epoch's hard negatives of q.
        draw = rng.choice(n, min(n, pool + len(members)), replace=False)
        draw = draw[groups[draw] != groups[q]][:pool]
        candidates = np.union1d(draw, hard.get(q, draw[:0]))
        if len(candidates) < n_negatives:  # few negatives at all: repeat them
            candidates = np.resize(candidates, n_negatives)
        nearest = candidates[np.argsort(distances[row, candidates], kind="stable")[:n_negatives]]
        hard[q] = nearest
        tuples.append(np.concatenate([[q, positive], nearest]))
    return tuples
