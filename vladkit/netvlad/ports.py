"""Checkpoints of Nanne/pytorch-NetVlad, the most used PyTorch port, into vladkit's modules.

That port's model is an ``nn.Module`` with two children: ``encoder``, VGG-16's
``features`` cut before the last ReLU and max-pooling (``features[:-2]``, so conv5_3
before its ReLU, as the paper), and ``pool``, its NetVLAD layer. Its ``main.py`` saves
``{"epoch", "state_dict", "optimizer", "best_score", ...}`` (``checkpoint.pth.tar``); with
``--nGPU`` > 1 each child is wrapped in ``nn.DataParallel``, which adds ``module.`` to its
keys. The key mapping:

=================================  ==========================================================
port's key                         vladkit
=================================  ==========================================================
``pool.conv.weight`` (K, D, 1, 1)  ``NetVLAD.weight`` (K, D): the 1x1 convolution's kernels
``pool.conv.bias`` (K,)            ``NetVLAD.bias`` (its ``vladv2``; absent: ``bias=False``)
``pool.centroids`` (K, D)          ``NetVLAD.centers`` (the same sign: V_k sums x - c_k)
``encoder.<i>.weight/bias``        ``build_backbone("vgg16")``'s ``<i>.weight/bias``
                                   (torchvision's ``features`` indices, 0 to 28)
=================================  ==========================================================

Its forward is this layer's with ``layout="KxD"`` and every normalisation on
(``normalize_input`` is its constructor's option, True by default, not saved in the
checkpoint: pass it if you changed it). It normalises with ``F.normalize``, x / max(||x||,
1e-12), where vladkit uses x / sqrt(||x||^2 + 1e-12) (MATLAB's): the two differ by
relative 1e-12 / ||x||^2, nothing for real features (tested: 1e-6 on random maps).
"""

from __future__ import annotations

import os

import torch

from .backbones import build_backbone
from .layer import NetVLAD
from .modules import ImageRetrievalModel

__all__ = ["netvlad_from_pytorch_netvlad", "model_from_pytorch_netvlad"]


def _state_dict(source, weights_only):
    """The model's state_dict from a path, a checkpoint dict or a state_dict; DataParallel's
    ``module.`` removed."""
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(os.fspath(source), map_location="cpu", weights_only=weights_only)
        except Exception as error:  # pickle.UnpicklingError for non-tensor objects
            if not weights_only:
                raise
            raise ValueError(
                f"could not read {os.fspath(source)!r} with weights_only=True ({error}); if you "
                "trust the file (it can run code when unpickled), pass weights_only=False") from error
    if not isinstance(source, dict):
        raise TypeError(f"expected a checkpoint path, a checkpoint dict or a state_dict, got "
                        f"{type(source).__name__}")
    state = source.get("state_dict", source)
    return {key.replace("module.", ""): value for key, value in state.items()}


def netvlad_from_pytorch_netvlad(source, *, normalize_input=True, weights_only=True):
    """The NetVLAD layer of a Nanne/pytorch-NetVlad checkpoint (see the module's mapping).

    Parameters
    ----------
    source : path, checkpoint dict or state_dict
        ``checkpoint.pth.tar`` as its ``main.py`` writes it, the dict ``torch.load`` gives,
        or a state_dict of the whole model (``pool.*`` keys) or of the layer alone
        (``conv.weight``, ``centroids``).
    normalize_input : bool, default=True
        The port's ``normalize_input`` (not in its checkpoints).
    weights_only : bool, default=True
        ``torch.load``'s: True reads tensors and plain containers only (safe on untrusted
        files); its checkpoints with other Python objects need False.

    Returns
    -------
    NetVLAD
        float32, ``layout="KxD"``, metadata ``{"imported_from": "Nanne/pytorch-NetVlad"}``.
    """
    state = _state_dict(source, weights_only)
    prefix = "pool." if "pool.conv.weight" in state else ""
    missing = [key for key in ("conv.weight", "centroids") if prefix + key not in state]
    if missing:
        raise ValueError(f"not a pytorch-NetVlad state_dict: no {', '.join(prefix + k for k in missing)} "
                         f"(keys: {sorted(state)[:8]}{' ...' if len(state) > 8 else ''})")
    weight = state[prefix + "conv.weight"]
    centers = state[prefix + "centroids"]
    bias = state.get(prefix + "conv.bias")
    if weight.ndim != 4 or weight.shape[2:] != (1, 1) or centers.shape != weight.shape[:2]:
        raise ValueError(f"pytorch-NetVlad's conv.weight must be (K, D, 1, 1) and centroids (K, D), got "
                         f"{tuple(weight.shape)} and {tuple(centers.shape)}")
    n_clusters, dim = centers.shape
    layer = NetVLAD(n_clusters, dim, bias=bias is not None, normalize_input=normalize_input)
    with torch.no_grad():
        layer.weight.copy_(weight[:, :, 0, 0])
        layer.centers.copy_(centers)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.metadata = {"imported_from": "Nanne/pytorch-NetVlad", "init": "v2" if bias is not None else "v1"}
    return layer


def model_from_pytorch_netvlad(source, *, normalize_input=True, weights_only=True):
    """The whole VGG-16 + NetVLAD model of a Nanne/pytorch-NetVlad checkpoint, as an
    :class:`ImageRetrievalModel` (``build_backbone("vgg16")`` with the checkpoint's encoder
    weights, and :func:`netvlad_from_pytorch_netvlad`'s layer); parameters as there.

    Its images are as the port's: RGB, [0, 1], normalised with ImageNet's mean (0.485,
    0.456, 0.406) and standard deviation (0.229, 0.224, 0.225).
    """
    state = _state_dict(source, weights_only)
    encoder = {key[len("encoder."):]: value for key, value in state.items() if key.startswith("encoder.")}
    if not encoder:
        raise ValueError("the checkpoint has no encoder.* weights (a pooling layer alone?): use "
                         "netvlad_from_pytorch_netvlad")
    backbone = build_backbone("vgg16", layer="conv5_3", weights=None)
    backbone.load_state_dict(encoder)
    pooling = netvlad_from_pytorch_netvlad(state, normalize_input=normalize_input)
    return ImageRetrievalModel(backbone, pooling)
