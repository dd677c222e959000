r"""Training NetVLAD on sets of frozen local descriptors, from weak supervision.

Each image is a *set* of local descriptors (dense RootSIFT, say) that stays fixed; only the
NetVLAD layer (assignment weights w, biases b, centers c) is learnt. Supervision is weak:
``groups`` say which sets show the same thing (same folder or label, or an image and its
attacked copies), nothing more. See :func:`train_netvlad` (its epoch loop, hard-negative
mining and validation are in :mod:`vladkit.netvlad.trainer`).

References
----------
Arandjelović, Gronát, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly
supervised place recognition", CVPR 2016 (and their MATLAB code, ``trainWeakly.m``).
Douze et al., "Evaluation of GIST descriptors for web-scale image search", CIVR 2009
(the Copydays-style attacks of :data:`vladkit.datasets.ATTACKS`).
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from sklearn.utils import check_random_state

from ..datasets.near_duplicates import attacked_copies, copy_groups, _positive_int
from ..encoders.netvlad_params import DEFAULT_INIT, NetVLADParams, sample_descriptors
from ..vocabulary.kmeans import KMeansVocabulary
from .layer import NetVLAD
from .trainer import _Trainer, _Validation, _deterministic_torch, _state

__all__ = ["LOSSES", "attacked_copies", "copy_groups", "train_netvlad"]

#: The training objectives of :func:`train_netvlad`.
LOSSES = ("triplet", "classification", "triplet+classification")


# ------------------------------------------------------------------------ helpers


def _positive_float(name, value, allow_zero=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, "
                         f"got {value!r}")
    return value


def _as_sets(descriptor_sets, name="descriptor_sets"):
    """The (n_i, D) float arrays of a list of arrays / LocalFeatures (not copied), checked."""
    if isinstance(descriptor_sets, np.ndarray) or not hasattr(descriptor_sets, "__len__"):
        raise TypeError(f"{name} must be a list of (n_i, D) arrays or LocalFeatures, got "
                        f"{type(descriptor_sets).__name__}")
    sets, dim = [], None
    for i, item in enumerate(descriptor_sets):
        X = np.asarray(getattr(item, "descriptors", item))
        if X.ndim != 2:
            raise ValueError(f"{name}[{i}]: expected an (n, D) array of descriptors, got shape {X.shape}")
        if X.dtype.kind not in "fiu":
            raise TypeError(f"{name}[{i}]: expected numbers, got dtype {X.dtype}")
        if len(X):
            if dim is None:
                dim = X.shape[1]
            elif X.shape[1] != dim:
                raise ValueError(f"{name}[{i}]: descriptors of dimension {X.shape[1]}, earlier sets {dim}")
            if not np.isfinite(X).all():
                raise ValueError(f"{name}[{i}]: descriptors contain NaN or inf")
        sets.append(X)
    if dim is None:
        raise ValueError(f"{name} holds no descriptors")
    return sets, dim


def _group_ids(groups, n, name="groups"):
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"{name} must give one group per descriptor set ({n}), got shape {groups.shape}")
    _, ids = np.unique(groups, return_inverse=True)
    return ids.astype(np.intp)


def _seed(random_state):
    """An int seed for numpy Generators and torch, as the other NetVLAD functions read it."""
    if random_state is None:
        return 0
    return int(check_random_state(random_state).randint(2**31 - 1))


def _split_validation(group_ids, fraction, rng, keep=1):
    """(training indices, validation indices) for a held-out ``fraction``.

    The validation needs two groups, one with two sets or more: its queries need a
    positive and negatives (with one group every ranking is perfect, mAP 1). Two ways:

    - whole groups, when groups are small (a group's share, fraction x its size, would be
      under 2 sets on average: an image and its copies) and there are 4 or more:
      ``round(fraction x groups)`` of them, at least 2, at most all but 2 (training needs
      two groups);
    - a share of every group otherwise (labelled folders, or few groups: every group is
      seen in training and in validation): ``round(fraction x size)`` of its sets, at
      least 2 (a query and its positive), as long as it keeps ``keep`` for training (2
      for the triplet loss, a query and its positive; 1 for classification). Where that
      leaves no usable validation, whole groups are held out if there are 4 or more.

    Raises
    ------
    ValueError
        When neither gives a usable validation; the message states the minimum.
    """
    sizes = np.bincount(group_ids)
    n_groups = len(sizes)

    def whole_groups():
        n_val = min(n_groups - 2, max(2, round(fraction * n_groups)))
        return np.isin(group_ids, rng.choice(n_groups, n_val, replace=False))

    def usable(held):
        held_sizes = np.bincount(group_ids[held], minlength=n_groups)
        return np.count_nonzero(held_sizes) >= 2 and held_sizes.max() >= 2

    if fraction * sizes.mean() < 2 and n_groups >= 4:
        held = whole_groups()
    else:
        held = np.zeros(len(group_ids), dtype=bool)
        for g in range(n_groups):
            members = np.flatnonzero(group_ids == g)
            take = max(0, min(len(members) - keep, max(2, round(fraction * len(members)))))
            held[rng.choice(members, take, replace=False)] = True
        if not usable(held) and n_groups >= 4:
            held = whole_groups()
    if not usable(held):
        raise ValueError(
            f"validation={fraction} cannot hold out a validation set from {n_groups} groups of "
            f"{sizes.min()}-{sizes.max()} sets: validation needs two groups, one with two sets or more (a "
            f"query, its positive and a negative), and a group that is split keeps {keep} for training. "
            f"That takes one group of at least {keep + 2} sets and another of at least {keep + 1}, or 4 "
            "groups or more (2 held out whole, one of them of two sets or more); or train without "
            "validation")
    return np.flatnonzero(~held), np.flatnonzero(held)


# ------------------------------------------------------------------------- training


def train_netvlad(descriptor_sets, groups, *, n_clusters=64, init=DEFAULT_INIT, loss="triplet", epochs=10,
                  lr=1e-3, optimizer="adam", weight_decay=0.0, lr_decay=None, batch_size=8,
                  descriptors_per_step=500, margin=0.1, n_negatives=10, negative_pool=1000,
                  queries_per_epoch=None, classification_weight=1.0, head_lr=None, validation=None,
                  keep_best=True,
                  n_init_descriptors=50_000, init_per_image=100, kmeans_iter=100,
                  random_state=0, n_threads=None, progress=True, log=None, callback=None, metadata=None):
    r"""Train a NetVLAD layer on sets of frozen local descriptors; return its parameters.

    The layer (:class:`vladkit.netvlad.NetVLAD`, K clusters of dimension D) maps a set of
    descriptors to the L2-normalised, intra-normalised vector
    :math:`v = [V_1, \dots, V_K]`, :math:`V_k = \sum_i a_k(x_i)(x_i - c_k)`,
    :math:`a_k(x) = \mathrm{softmax}_k(w_k^\top x + b_k)`; w, b and c are trained.

    **Initialisation** (the authors' ``getClusters.m``): ``n_init_descriptors`` (50,000)
    descriptors, ``init_per_image`` (100) from each of ceil(50,000 / 100) random sets,
    input-normalised; k-means (:class:`vladkit.KMeansVocabulary`, ``kmeans_iter`` = 100
    Lloyd iterations) gives the centers c; "v1" sets w = α c/‖c‖ and no bias, "v2"
    w = 2αc, b = −α‖c‖² (α from the sample, see :func:`vladkit.encoders.netvlad.init_netvlad`).
    ``init`` may also be :class:`~vladkit.encoders.netvlad.NetVLADParams` to start from.

    **Triplet loss** (``loss="triplet"``, the paper's weakly supervised ranking loss). Each
    set q in turn is a query; its potential positives are the other sets of its group, its
    negatives the sets of other groups. With v the network's vectors and
    :math:`d^2(q, x) = \lVert v_q - v_x \rVert^2` (squared Euclidean distance of the
    normalised vectors),

    .. math::

        L_q = \sum_{j=1}^{n} \max\bigl(0,\; d^2(q, p^*) + m - d^2(q, n_j)\bigr),
        \qquad p^* = \arg\min_{p \in P_q} d^2(q, p),

    with margin m = ``margin`` (0.1): the best-matching positive must be closer than every
    one of the n = ``n_negatives`` (10) hard negatives n_j by m. At the start of each epoch
    every training set is encoded (a cache of vectors, from the current parameters); p*
    and the negatives are chosen in it: for each query, ``negative_pool`` (1,000) random
    negatives plus the query's hard negatives of the previous epoch, of which the
    ``n_negatives`` closest are kept (and remembered). The loss of a batch is the mean of
    :math:`L_q` over its ``batch_size`` queries, computed from fresh vectors (so gradients
    flow into the query, the positive and the negatives). Only violated terms contribute.

    **Classification loss** (``loss="classification"``, for labelled folders): a linear
    head (bias included, starting at zero) maps v to one score per group, trained with the
    cross-entropy :math:`-\log \mathrm{softmax}(W_h v + b_h)_{y}` jointly with the layer;
    the head is discarded afterwards. ``"triplet+classification"`` adds
    ``classification_weight`` times the cross-entropy of each batch's queries to the
    triplet loss.

    **Descriptors per step.** Each time a set is encoded during training it is represented
    by ``descriptors_per_step`` rows drawn at random (all its rows if it has fewer):
    bounded work per step, and a different subset every time (the cache, too, is
    encoded from fresh subsets each epoch). Inference (:class:`~vladkit.NetVLADEncoder`)
    uses every descriptor.

    **Determinism.** Every random choice comes from ``random_state`` (numpy Generators and
    ``torch.manual_seed``); torch runs with deterministic algorithms and ``n_threads``
    threads (the caller's torch settings are restored afterwards): the same inputs, seed
    and thread count give identical parameters.

    Parameters
    ----------
    descriptor_sets : list of (n_i, D) arrays or LocalFeatures
        One set per image (float16 is fine: rows are converted to float32 as they are
        drawn). Not copied: keep them bounded (e.g. a random subset of ~1,000 per image).
    groups : sequence of hashables, one per set
        Sets in the same group are positives of each other (a folder, a label, an image and
        its :func:`attacked_copies`); every group needs two sets for the triplet loss.
    n_clusters : int, default=64
        K (ignored when ``init`` is NetVLADParams).
    init : {"v1", "v2"} or NetVLADParams, default="v2" (:data:`~vladkit.encoders.netvlad_params.DEFAULT_INIT`)
    loss : {"triplet", "classification", "triplet+classification"}, default="triplet"
    epochs : int, default=10
        Passes over the training sets (each set a query once per epoch, or once in a
        classification batch).
    lr : float, default=1e-3
        Learning rate of the layer's parameters.
    optimizer : {"adam", "sgd"}, default="adam"
        Adam, or SGD with momentum 0.9 (the authors' choice for a whole CNN).
    weight_decay : float, default=0
        L2 penalty, applied by the optimiser to every trained parameter.
    lr_decay : (int, float) or None
        ``(every, factor)``: multiply the learning rates by ``factor`` every ``every``
        epochs (the authors halve every 5 epochs: ``(5, 0.5)``).
    batch_size : int, default=8
        Queries (triplet) or sets (classification) per optimisation step.
    descriptors_per_step : int, default=500
    margin : float, default=0.1
    n_negatives : int, default=10
    negative_pool : int, default=1000
    queries_per_epoch : int or None
        Queries (or classification sets) per epoch, a new random selection each epoch
        (default: every training set). The cache is still refreshed every epoch: with many
        sets (an image and its copies), fewer queries per epoch refresh it more often.
    classification_weight : float, default=1
        Weight of the cross-entropy in "triplet+classification".
    head_lr : float or None
        Learning rate of the classification head (default ``lr``).
    validation : None, float in (0, 1), or (descriptor_sets, groups)
        Evaluated before training and after every epoch: the mean average precision of
        each validation set searching the others, positives its group (the vectors of
        fixed random subsets of ``descriptors_per_step`` rows). A float holds out that
        fraction of the sets (not trained on): whole groups when groups are small (an
        image and its copies) and 4 or more, at least 2 of them and at most all but 2; a
        share of every group otherwise (labelled folders, or few groups), at least 2 sets
        of a group while it keeps 2 for training (1 for the classification loss). The
        validation needs two groups, one of two sets or more (queries need a positive and
        negatives: with one group every ranking is perfect, mAP 1); a ValueError states
        the minimum when the groups are too few or too small for that.
    keep_best : bool, default=True
        With validation, return the parameters of the epoch (0: the initialisation) with
        the best validation mAP rather than the last.
    n_init_descriptors, init_per_image, kmeans_iter : int
        The initialisation's sample and k-means iterations (see above).
    random_state : int, RandomState or None, default=0
        None is seed 0 (training is always reproducible).
    n_threads : int or None
        torch threads (default: every core). Results depend on it (the order of float
        sums): record it with the results.
    progress : bool, default=True
        A tqdm progress bar on stderr, and one line per epoch.
    log : callable(str) or None
        Receives the per-epoch lines (default: written above the progress bar when
        ``progress``, nowhere otherwise).
    callback : callable(epoch, layer) or None
        Called after every epoch (and with epoch 0 before training) with the layer being
        trained (read it, e.g. ``layer.to_params()``; do not modify it).
    metadata : dict or None
        JSON-able entries for the parameters' metadata (e.g. ``descriptor_type``).

    Returns
    -------
    NetVLADParams
        Layout "KxD", all normalisations on. ``metadata`` holds ``init``, ``alpha`` and a
        ``training`` summary: the options above, the number of sets and groups trained on
        (``n_sets``, ``n_groups``: without the held-out ones) and validated on
        (``n_validation_sets``, ``n_validation_groups``), the per-epoch history (mean loss,
        active queries, validation mAP) and the epoch returned; no timings (they go to
        ``log``), so the same inputs, seed and threads give the same bytes once saved.

    References
    ----------
    R. Arandjelović, P. Gronát, A. Torii, T. Pajdla, J. Sivic, "NetVLAD: CNN architecture
    for weakly supervised place recognition", CVPR 2016 (Section 4, the triplet ranking
    loss and hard negative mining; their ``trainWeakly.m``: margin 0.1, 10 negatives,
    1,000 sampled, the hard-negative cache).
    """
    sets, dim = _as_sets(descriptor_sets)
    group_ids = _group_ids(groups, len(sets))
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if not isinstance(init, NetVLADParams) and init not in ("v1", "v2"):
        raise ValueError(f"init must be 'v1', 'v2' or NetVLADParams, got {init!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    epochs = int(epochs)
    lr = _positive_float("lr", lr)
    head_lr = lr if head_lr is None else _positive_float("head_lr", head_lr)
    weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
    margin = _positive_float("margin", margin, allow_zero=True)
    classification_weight = _positive_float("classification_weight", classification_weight, allow_zero=True)
    batch_size = _positive_int("batch_size", batch_size)
    per_step = _positive_int("descriptors_per_step", descriptors_per_step)
    n_negatives = _positive_int("n_negatives", n_negatives)
    negative_pool = _positive_int("negative_pool", negative_pool)
    if lr_decay is not None:
        if not isinstance(lr_decay, (tuple, list)) or len(lr_decay) != 2:
            raise ValueError(f"lr_decay must be (every, factor) or None, got {lr_decay!r}")
        lr_decay = (_positive_int("lr_decay[0]", lr_decay[0]), _positive_float("lr_decay[1]", lr_decay[1]))
    if queries_per_epoch is not None:
        queries_per_epoch = _positive_int("queries_per_epoch", queries_per_epoch)
    n_threads = torch.get_num_threads() if n_threads is None else _positive_int("n_threads", n_threads)
    seed = _seed(random_state)
    say = log if log is not None else (_write if progress else (lambda text: None))

    # Validation sets: held out from the training sets, or given.
    train, val_sets, val_groups = np.arange(len(sets)), None, None
    if isinstance(validation, (float, np.floating)) and not isinstance(validation, bool):
        if not 0 < validation < 1:
            raise ValueError(f"validation as a fraction must lie in (0, 1), got {validation!r}")
        # The triplet loss trains on groups of two sets or more: each group keeps two.
        train, held = _split_validation(group_ids, float(validation), np.random.default_rng([seed, 21]),
                                        keep=2 if "triplet" in loss else 1)
        val_sets, val_groups = [sets[i] for i in held], group_ids[held]
    elif isinstance(validation, (tuple, list)) and len(validation) == 2:
        val_sets, val_dim = _as_sets(validation[0], "validation[0]")
        if val_dim != dim:
            raise ValueError(f"validation descriptors have dimension {val_dim}, the training ones {dim}")
        val_groups = _group_ids(validation[1], len(val_sets), "validation[1]")
    elif validation is not None:
        raise TypeError("validation must be None, a fraction in (0, 1) or (descriptor_sets, groups), "
                        f"got {type(validation).__name__}")
    if val_groups is not None and np.bincount(val_groups).max() < 2:
        raise ValueError("the validation sets hold no two sets of the same group: nothing to retrieve "
                         "(hold out a larger fraction, or give validation=None)")
    if val_groups is not None and len(np.unique(val_groups)) < 2:
        raise ValueError("the validation sets are all of one group: no negatives, so every ranking is "
                         "perfect (mAP 1) whatever the training; give sets of two groups or more")
    train_groups = group_ids[train]
    n_groups = len(np.unique(train_groups))
    if n_groups < 2:
        raise ValueError(f"the {loss} loss needs at least two groups (negatives, or classes, come from "
                         "other groups)")
    if "triplet" in loss and np.bincount(train_groups).max() < 2:
        raise ValueError("the triplet loss needs groups of two sets or more (a query and a positive); "
                         "every group has one set: give labels, or attacked copies as positives")
    training_sets = [sets[i] for i in train]

    with _deterministic_torch(seed, n_threads):
        if isinstance(init, NetVLADParams):
            if init.dim != dim:
                raise ValueError(f"init has dimension {init.dim}, the descriptors {dim}")
            layer = NetVLAD.from_params(init)
            version = init.metadata.get("init", "given")
        else:
            layer = _initial_layer(training_sets, _positive_int("n_clusters", n_clusters), init,
                                   n_init_descriptors, init_per_image, kmeans_iter, seed, n_threads)
            version = init
        trainer = _Trainer(layer, training_sets, train_groups, dim, loss=loss, lr=lr, head_lr=head_lr,
                           optimizer=optimizer, weight_decay=weight_decay, batch_size=batch_size,
                           per_step=per_step, margin=margin, n_negatives=n_negatives,
                           negative_pool=negative_pool, classification_weight=classification_weight,
                           rng=np.random.default_rng([seed, 20]))
        validate = (_Validation(layer, val_sets, val_groups, dim, per_step, seed, trainer.normalize)
                    if val_sets is not None else None)
        per_epoch = len(train) if queries_per_epoch is None else min(len(train), queries_per_epoch)
        history = [{"epoch": 0, "loss": None, "active": None,
                    "validation_map": validate() if validate else None}]
        best = (history[0]["validation_map"], 0, _state(layer))
        if validate:
            say(f"epoch 0 (initialisation): validation mAP {best[0]:.4f}")
        if callback is not None:
            trainer.call_back(callback, 0)
        from tqdm import tqdm

        with tqdm(total=epochs * math.ceil(per_epoch / batch_size), desc="training NetVLAD", unit="step",
                  disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
            for epoch in range(1, epochs + 1):
                epoch_start = time.perf_counter()
                mean_loss, active = trainer.epoch(per_epoch, bar)
                if lr_decay is not None and epoch % lr_decay[0] == 0:
                    trainer.decay(lr_decay[1])
                score = validate() if validate else None
                seconds = time.perf_counter() - epoch_start
                # No timing in the history: it goes into the file, whose bytes must not
                # depend on the machine's load (the log line below has the seconds).
                history.append({"epoch": epoch, "loss": mean_loss, "active": active,
                                "validation_map": score})
                line = f"epoch {epoch}/{epochs}: loss {mean_loss:.4f}"
                if active is not None:
                    line += f", {active}/{per_epoch} queries with a violated margin"
                if score is not None:
                    line += f", validation mAP {score:.4f}"
                    if score >= best[0]:  # ties: the later epoch (the lower training loss)
                        best = (score, epoch, _state(layer))
                say(line + f" ({seconds:.0f} s)")
                bar.set_postfix(loss=f"{mean_loss:.4f}", **({} if score is None else {"val": f"{score:.3f}"}))
                if callback is not None:
                    trainer.call_back(callback, epoch)
        trainer.finish()
        returned = epochs
        if keep_best and best[0] is not None:
            layer.load_state_dict(best[2])
            returned = best[1]
    summary = {
        "loss": loss, "epochs": epochs, "returned_epoch": returned, "lr": lr, "optimizer": optimizer,
        "weight_decay": weight_decay, "lr_decay": None if lr_decay is None else list(lr_decay),
        "batch_size": batch_size, "descriptors_per_step": per_step, "queries_per_epoch": per_epoch,
        "margin": margin if "triplet" in loss else None,
        "n_negatives": n_negatives if "triplet" in loss else None,
        "negative_pool": negative_pool if "triplet" in loss else None,
        "classification_weight": classification_weight if loss == "triplet+classification" else None,
        "head_lr": head_lr if "classification" in loss else None,
        "n_sets": len(train), "n_groups": n_groups,
        "n_validation_sets": None if val_sets is None else len(val_sets),
        "n_validation_groups": None if val_groups is None else len(np.unique(val_groups)),
        "random_state": seed, "n_threads": n_threads,
        "history": history,
    }
    extra = dict(metadata or {})
    extra.setdefault("init", version)
    extra["training"] = summary
    return layer.to_params(metadata=extra)


def _initial_layer(sets, n_clusters, version, n_descriptors, per_image, kmeans_iter, seed, n_threads):
    """k-means on a MATLAB-style sample (``getClusters.m``), then the v1/v2 layer."""
    sample = np.asarray(sample_descriptors(sets, n_descriptors, per_image, seed), dtype=np.float32)
    if len(sample) < n_clusters:
        raise ValueError(f"{len(sample)} descriptors to initialise {n_clusters} clusters from: give more "
                         "descriptors or fewer clusters")
    vocabulary = KMeansVocabulary(n_clusters, max_descriptors=len(sample), max_iter=kmeans_iter,
                                  random_state=seed, n_jobs=n_threads)
    return NetVLAD.from_vocabulary(vocabulary, sample, version, random_state=seed, n_descriptors=len(sample))


def _write(text):
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)
