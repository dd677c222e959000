r"""Training a whole network end to end on images: a backbone and NetVLAD (or any pooling),
from weak supervision (groups of matching images), with the NetVLAD paper's hard-negative
mining.

:func:`init_netvlad_from_images` is the paper's initialisation (k-means on descriptors
of the backbone's feature maps); :func:`train_on_images` the training loop, deterministic
on the CPU and resumable from a checkpoint.

References
----------
Arandjelović, Gronát, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly
supervised place recognition", CVPR 2016.
Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018.
Wang, Han, Huang, Dong & Scott, "Multi-similarity loss with general pair weighting for
deep metric learning", CVPR 2019.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .._util.io import atomic_output
from ..datasets.near_duplicates import _positive_int
from .images import ImageGroupsDataset
from .layer import NetVLAD
from .mining import LOSSES, HardNegativeMiner
from .modules import ImageRetrievalModel
from .trainer import _deterministic_torch, _retrieval_map, _state
from .training import _positive_float, _seed

__all__ = ["calibrate_batchnorm", "embed_dataset", "init_netvlad_from_images", "load_image_model",
           "save_image_model", "train_on_images"]

_CHECKPOINT_FORMAT = "vladkit.train_on_images/1"
_MODEL_FORMAT = "vladkit.netvlad.image_model/1"


@torch.no_grad()
def embed_dataset(model, dataset, indices=None, batch_size=64):
    """The (n, d) float32 numpy vectors of dataset items ``indices`` (default all), without
    augmentation, gradients or BatchNorm updates: the model in eval mode (its mode is
    restored after)."""
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.intp)
    training = model.training
    model.eval()
    try:
        parts = [model(dataset.batch(indices[first:first + batch_size], augment=False)).float().numpy()
                 for first in range(0, len(indices), batch_size)]
    finally:
        model.train(training)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats]


def _fresh(batchnorm):
    """Whether a BatchNorm layer has never seen data: its running statistics are still
    torch's initial ones (mean 0, variance 1), as in a network with random weights."""
    return bool((batchnorm.running_mean == 0).all() and (batchnorm.running_var == 1).all())


@torch.no_grad()
def calibrate_batchnorm(module, dataset, indices, batch_size=32):
    r"""Estimate the running statistics of ``module``'s BatchNorm layers on dataset items.

    A network with random weights has BatchNorm statistics that never saw data (mean 0,
    variance 1): in eval mode it is a different function from the one training sees. The
    statistics are reset and re-estimated as cumulative averages (momentum None) over
    forward passes in train mode, without gradients, on the items ``indices`` (no
    augmentation); the layers' momenta and the module's mode are restored after.
    """
    layers = _batchnorms(module)
    momenta = [layer.momentum for layer in layers]
    training = module.training
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    module.train()
    try:
        for first in range(0, len(indices), batch_size):
            module(dataset.batch(indices[first:first + batch_size], augment=False))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        module.train(training)


def init_netvlad_from_images(model_or_backbone, dataset, n_clusters=64, *, n_images=500, per_image=100,
                             version="v2", random_state=0, batch_size=32, n_threads=None,
                             batchnorm_statistics=False, **netvlad_options):
    r"""The NetVLAD paper's initialisation, from images: k-means on backbone descriptors.

    The backbone (in eval mode, no gradients; optionally its BatchNorm statistics first
    estimated on the images, see ``batchnorm_statistics``) maps ``n_images`` items drawn at random from
    ``dataset`` (no augmentation) to feature maps (D, h, w); each map is h w descriptors of
    dimension D, of which ``per_image`` are drawn at random; then
    :meth:`NetVLAD.from_vocabulary` (K = ``n_clusters``) clusters the input-normalised
    sample with k-means for the centers :math:`c_k` and sets, for "v2",
    :math:`w_k = 2 \alpha c_k`, :math:`b_k = -\alpha \lVert c_k \rVert^2` with
    :math:`\alpha = -\log(0.01) / \overline{d_2^2 - d_1^2}`, so that the soft assignment
    starts as :math:`\mathrm{softmax}_k(-\alpha \lVert x - c_k \rVert^2)`
    (Arandjelović et al.'s ``getClusters.m`` and ``netvlad_layer`` init).

    Parameters
    ----------
    model_or_backbone : ImageRetrievalModel or nn.Module
        A model (its pooling is replaced by the new layer, its whitening dropped: its input
        size changes) or a backbone ((B, 3, H, W) -> (B, D, h, w)), wrapped into a new
        :class:`ImageRetrievalModel`.
    dataset : ImageGroupsDataset
    n_clusters : int, default=64
    n_images, per_image : int, default 500 and 100 (MATLAB's 50,000 descriptors)
    version : {"v1", "v2"}, default="v2"
    random_state : int, default=0
    n_threads : int or None
        torch threads (default all); deterministic given it.
    batchnorm_statistics : {False, True, "auto"}, default=False
        Estimate the backbone's BatchNorm running statistics on the same images first
        (:func:`calibrate_batchnorm`): "auto" does it when every BatchNorm layer still
        has its initial statistics (random weights), never for a pretrained network.
        Off by default: a random resnet18 with its initial statistics (mean 0, variance
        1: no normalisation in eval mode) retrieved 15-Scene near duplicates better (mAP
        0.69 on a small validation set, 0.58 with estimated statistics), and training
        with ``batchnorm="frozen"`` keeps whichever statistics the network has.
    **netvlad_options
        Passed to :meth:`NetVLAD.from_vocabulary` (``normalize_input``, ``layout``...).

    Returns
    -------
    ImageRetrievalModel
        With ``pooling`` the initialised :class:`NetVLAD`.
    """
    if isinstance(model_or_backbone, ImageRetrievalModel):
        model, backbone = model_or_backbone, model_or_backbone.backbone
    else:
        model, backbone = None, model_or_backbone
    n_images = min(_positive_int("n_images", n_images), len(dataset))
    per_image = _positive_int("per_image", per_image)
    seed = _seed(random_state)
    n_threads = torch.get_num_threads() if n_threads is None else _positive_int("n_threads", n_threads)
    rng = np.random.default_rng([seed, 33])
    chosen = np.sort(rng.choice(len(dataset), n_images, replace=False))
    sets = []
    with _deterministic_torch(seed, n_threads), torch.no_grad():
        layers = _batchnorms(backbone)
        if batchnorm_statistics is True or (batchnorm_statistics == "auto" and layers
                                             and all(_fresh(layer) for layer in layers)):
            calibrate_batchnorm(backbone, dataset, chosen, batch_size)
        training = backbone.training
        backbone.eval()
        try:
            for first in range(0, len(chosen), batch_size):
                maps = backbone(dataset.batch(chosen[first:first + batch_size], augment=False)).float()
                for descriptors in maps.flatten(2).transpose(1, 2).numpy():   # (h w, D) each
                    if len(descriptors) > per_image:
                        descriptors = descriptors[np.sort(rng.choice(len(descriptors), per_image, replace=False))]
                    sets.append(descriptors)
        finally:
            backbone.train(training)
        sample = np.concatenate(sets)
        if len(sample) < n_clusters:
            raise ValueError(f"{len(sample)} descriptors from {n_images} images to initialise {n_clusters} "
                             "clusters: give more images or fewer clusters")
        layer = NetVLAD.from_vocabulary(int(n_clusters), sample, version, random_state=seed,
                                        n_descriptors=len(sample), **netvlad_options)
    if model is None:
        return ImageRetrievalModel(backbone, layer)
    model.pooling, model.whitening = layer, None
    return model


def _write(text):
    print(text, file=sys.stderr, flush=True)


def _save_atomically(state, path):
    """torch.save through :func:`vladkit._util.io.atomic_output`: a crash while writing
    leaves the previous checkpoint whole, and the file gets the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as stream:
        torch.save(state, stream)


def train_on_images(model, dataset, *, loss="triplet", epochs=5, lr=1e-4, optimizer="adam", weight_decay=0.0,
                    batch_size=4, n_negatives=5, negative_pool=500, refresh_every=None, margin=None,
                    queries_per_epoch=None, batchnorm="frozen", validation=None, keep_best=False,
                    checkpoint=None, resume=False,
                    random_state=0,
                    n_threads=None, embed_batch_size=64, log=None, progress=False):
    r"""Train a whole image-retrieval network (backbone and pooling) on groups of images.

    Each step takes ``batch_size`` queries; for each, a :class:`HardNegativeMiner` gives the
    closest positive :math:`p^*` and the ``n_negatives`` hardest negatives from its cache
    (the vectors of every item, refreshed every ``refresh_every`` steps, or at the start
    of every epoch); the tuple's images (augmented if ``dataset.augment``) go through the
    network in train mode, and the loss, e.g. the NetVLAD paper's

    .. math::

        L_q = \sum_{j=1}^{k} \max\bigl(0,\; \lVert v_q - v_{p^*} \rVert^2 + m
              - \lVert v_q - v_{n_j} \rVert^2\bigr), \qquad m = 0.1,

    averaged over the batch's queries, is minimised by ``optimizer`` (Adam, or SGD with
    momentum 0.9 as the paper's). Gradients flow into the query, the positive and the
    negatives alike, through the pooling and the backbone.

    **Determinism.** Every random choice (query order, negative pools, augmentations)
    comes from ``random_state``; torch runs with deterministic algorithms and
    ``n_threads`` threads (restored after): the same inputs, seed and thread count give
    identical weights on the CPU.

    **Checkpoints.** With ``checkpoint`` (a path), after every epoch the model's and the
    optimiser's state, the miner's (cache, hard negatives, generator), torch's generator
    and the history are written atomically (a temporary file renamed over the last one).
    ``resume=True`` continues from that file when it exists, and ends with the same weights
    as an uninterrupted run.

    Parameters
    ----------
    model : nn.Module
        (B, 3, H, W) -> (B, d) unit vectors, e.g. :func:`init_netvlad_from_images`'s.
        Trained in place (and returned).
    dataset : ImageGroupsDataset
        Training items and groups (every query needs a positive: groups of two items or
        more; an item alone in its group is never a query but serves as a negative).
    loss : {"triplet", "contrastive", "multi-similarity"}, default="triplet"
        See :mod:`vladkit.netvlad.mining`.
    epochs : int, default=5
    lr : float, default=1e-4
    optimizer : {"adam", "sgd"}, default="adam"
    weight_decay : float, default=0
    batch_size : int, default=4
        Queries per step (each brings 2 + ``n_negatives`` images).
    n_negatives, negative_pool, refresh_every, margin
        The miner's (:class:`HardNegativeMiner`).
    queries_per_epoch : int or None
        Queries per epoch, a new random selection each epoch (default: every item).
    batchnorm : {"frozen", "train"}, default="frozen"
        "frozen": BatchNorm layers stay in eval mode during the steps (their running
        statistics fixed, their affine weights trained), as Radenović et al. train
        (``set_batchnorm_eval``): a step's batch is a few tuples of correlated images, whose
        statistics are noisy, and the network trained is then the function the cache and
        the validation compute. "train": batch statistics, running averages updated.
    validation : ImageGroupsDataset or None
        Its mAP (each item searching the others, positives its group) before training
        and after every epoch.
    keep_best : bool, default=False
        With ``validation``: end with the weights of the epoch (0: the initialisation)
        of the best validation mAP, not the last (ties: the later epoch).
    checkpoint : str or Path or None
    resume : bool, default=False
    random_state : int, default=0
    n_threads : int or None
    embed_batch_size : int, default=64
        Images per forward pass when the cache and the validation vectors are computed.
    log : callable(str) or None
        One line per epoch, with its seconds (default: stderr if ``progress``, else none).
    progress : bool, default=False

    Returns
    -------
    model : the trained model, in eval mode (with ``keep_best``: the best epoch's)
    history : list of dict
        Per epoch (0: before training): ``epoch``, ``loss`` (mean over the epoch's
        tuples), ``validation_map``. No timings: they go to
        ``log`` only, so the history is the same on any machine.
    """
    if not isinstance(dataset, ImageGroupsDataset):
        raise TypeError(f"dataset must be an ImageGroupsDataset, got {type(dataset).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if batchnorm not in ("frozen", "train"):
        raise ValueError(f"batchnorm must be 'frozen' or 'train', got {batchnorm!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    lr = _positive_float("lr", lr)
    weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
    batch_size = _positive_int("batch_size", batch_size)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    if np.bincount(dataset.groups).max() < 2:
        raise ValueError("every group has a single item: no query has a positive (give labels, copies or pairs)")
    if dataset.n_groups < 2:
        raise ValueError("all items are in one group: there are no negatives")
    seed = _seed(random_state)
    n_threads = torch.get_num_threads() if n_threads is None else _positive_int("n_threads", n_threads)
    per_epoch = len(dataset) if queries_per_epoch is None else min(len(dataset),
                                                                   _positive_int("queries_per_epoch",
                                                                                 queries_per_epoch))
    say = log if log is not None else (_write if progress else (lambda text: None))
    miner = HardNegativeMiner(n_negatives, negative_pool, refresh_every, loss, margin, random_state=seed)
    miner._check()
    options = {"format": _CHECKPOINT_FORMAT, "loss": loss, "lr": lr, "optimizer": optimizer,
               "weight_decay": weight_decay, "batch_size": batch_size, "n_negatives": int(n_negatives),
               "negative_pool": int(negative_pool), "refresh_every": refresh_every, "margin": margin,
               "queries_per_epoch": per_epoch, "batchnorm": batchnorm, "keep_best": bool(keep_best), "random_state": seed, "n_items": len(dataset)}

    def validate():
        if validation is None:
            return None
        return float(_retrieval_map(embed_dataset(model, validation, batch_size=embed_batch_size),
                                    validation.groups))

    with _deterministic_torch(seed, n_threads):
        parameters = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "adam":
            optim = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
        else:
            optim = torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
        first_epoch, step, history, best = 1, 0, None, None
        if resume and Path(checkpoint).is_file():
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            changed = {key: (state["options"].get(key), value) for key, value in options.items()
                       if state["options"].get(key) != value}
            if changed:
                raise ValueError(f"{checkpoint} was written by a training with other options "
                                 f"(was, now): {changed}; resume with the same options")
            model.load_state_dict(state["model"])
            optim.load_state_dict(state["optimizer"])
            miner.load_state_dict(state["miner"])
            torch.set_rng_state(state["torch_rng"])
            first_epoch, step, history, best = state["epoch"] + 1, state["step"], state["history"], state["best"]
            say(f"resumed from {checkpoint} after epoch {state['epoch']}")
        if history is None:
            history = [{"epoch": 0, "loss": None, "validation_map": validate()}]
            if validation is not None:
                say(f"epoch 0 (initialisation): validation mAP {history[0]['validation_map']:.4f}")
            if keep_best and validation is not None:
                best = (history[0]["validation_map"], 0, _state(model))
        for epoch in range(first_epoch, epochs + 1):
            started = time.perf_counter()
            dataset.set_epoch(epoch)
            order = np.random.default_rng([seed, 32, epoch]).permutation(len(dataset))[:per_epoch]
            total, count = 0.0, 0
            for first in range(0, len(order), batch_size):
                if miner.due(step) or (refresh_every is None and first == 0):
                    # The cache is computed in eval mode (BatchNorm's running statistics,
                    # no update of them) and without gradients, as the paper's code does.
                    miner.refresh(embed_dataset(model, dataset, batch_size=embed_batch_size),
                                  dataset.groups, step)
                tuples = miner.mine(order[first:first + batch_size])
                step += 1
                if len(tuples) == 0:
                    continue
                model.train()
                if batchnorm == "frozen":
                    for layer in _batchnorms(model):
                        layer.eval()
                vectors = model(dataset.batch(tuples.reshape(-1))).view(len(tuples), tuples.shape[1], -1)
                value = miner.loss_value(vectors)
                optim.zero_grad(set_to_none=True)
                value.backward()
                optim.step()
                total += float(value.detach()) * len(tuples)
                count += len(tuples)
            score = validate()
            history.append({"epoch": epoch, "loss": total / count if count else 0.0,
                            "validation_map": score})
            if best is not None and score >= best[0]:
                best = (score, epoch, _state(model))
            if checkpoint is not None:
                _save_atomically({"options": options, "epoch": epoch, "step": step, "history": history,
                                  "model": model.state_dict(), "optimizer": optim.state_dict(),
                                  "miner": miner.state_dict(), "torch_rng": torch.get_rng_state(),
                                  "best": best}, checkpoint)
            line = f"epoch {epoch}/{epochs}: loss {history[-1]['loss']:.4f}"
            if score is not None:
                line += f", validation mAP {score:.4f}"
            say(line + f" ({time.perf_counter() - started:.0f} s, {math.ceil(len(order) / batch_size)} steps)")
    if best is not None:
        model.load_state_dict(best[2])
        say(f"kept epoch {best[1]} (validation mAP {best[0]:.4f})")
    model.eval()
    return model, history


def save_image_model(model, path, *, backbone, layer=None, image_size, metadata=None):
    """Write a backbone + NetVLAD :class:`ImageRetrievalModel` to a torch file (atomically):
    its ``state_dict`` and what rebuilds it (the :func:`build_backbone` name and cut, K, D,
    the working image size), for :func:`load_image_model`.

    Parameters
    ----------
    model : ImageRetrievalModel
        With a :class:`NetVLAD` pooling and no whitening.
    backbone, layer : str
        :func:`vladkit.netvlad.build_backbone`'s name and cut.
    image_size : int or (int, int)
        The size the model was trained at (what :class:`ImageGroupsDataset` should use).
    metadata : dict or None
        Anything else to keep (a training summary).
    """
    if not isinstance(model, ImageRetrievalModel) or not isinstance(model.pooling, NetVLAD):
        raise TypeError("save_image_model writes an ImageRetrievalModel with NetVLAD pooling")
    if model.whitening is not None:
        raise ValueError("save_image_model does not store a whitening; save model.state_dict() yourself")
    _save_atomically({"format": _MODEL_FORMAT, "backbone": str(backbone), "layer": layer,
                      "n_clusters": model.pooling.n_clusters, "dim": model.pooling.dim,
                      "bias": model.pooling.bias is not None, "image_size": image_size,
                      "metadata": dict(metadata or {}), "state_dict": model.state_dict()}, path)


def load_image_model(path):
    """Read what :func:`save_image_model` wrote: ``(model, info)``, the
    :class:`ImageRetrievalModel` in eval mode and the dict of the rest (``backbone``,
    ``layer``, ``n_clusters``, ``dim``, ``image_size``, ``metadata``)."""
    from .backbones import build_backbone

    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    if not isinstance(state, dict) or state.get("format") != _MODEL_FORMAT:
        raise ValueError(f"{path} is not a model written by vladkit netvlad train --backbone "
                         "(save_image_model)")
    backbone = build_backbone(state["backbone"], layer=state["layer"])
    model = ImageRetrievalModel(backbone, NetVLAD(state["n_clusters"], state["dim"], bias=state["bias"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, {key: value for key, value in state.items() if key not in ("state_dict", "format")}
