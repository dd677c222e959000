"""torchvision CNNs cut at a named layer, as the feature extractors under NetVLAD or GeM.

The NetVLAD paper cuts VGG-16 at conv5_3 before its ReLU (so the descriptors keep their
sign; ``Nanne/pytorch-NetVlad`` does the same: ``features[:-2]``); ResNets are cut after a
stage (layer3 keeps a 16x denser map than layer4 at half its channels). The builder keeps
torchvision's module names and indices, so torchvision's weights, and checkpoints of the
ports that cut the same way, load into it.

Weights: ``weights=None`` (random initialisation), or any torchvision weights enum or its
name ("DEFAULT", "IMAGENET1K_V1"), downloaded by torchvision on your machine the first time.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["BACKBONES", "build_backbone"]

#: name -> (cut layers, the default cut). VGG-16's cuts are named after the paper's layers
#: (conv5_3: the last convolution, before its ReLU); ResNets' after torchvision's stages.
BACKBONES = {
    "vgg16": (("conv5_3", "conv4_3"), "conv5_3"),
    "resnet18": (("layer3", "layer4"), "layer3"),
    "resnet34": (("layer3", "layer4"), "layer3"),
    "resnet50": (("layer3", "layer4"), "layer3"),
    "resnet101": (("layer3", "layer4"), "layer3"),
}

# Index of the convolution in torchvision's vgg16().features.
_VGG16_CONVOLUTIONS = {"conv4_3": 21, "conv5_3": 28}


def _torchvision():
    try:
        import torchvision
    except ImportError as error:  # pragma: no cover - torchvision is in the torch extra
        raise ImportError("build_backbone needs torchvision: pip install torch==2.14.1 "
                          "torchvision==0.29.1, or any matching pair (README, Install)") from error
    except RuntimeError as error:  # pragma: no cover - a torchvision built for another torch
        raise ImportError(f"torchvision does not load beside this torch ({error}): install the "
                          "torchvision built for your torch (README, Install)") from error
    return torchvision


def build_backbone(name="resnet18", *, layer=None, weights=None):
    """A torchvision CNN cut at ``layer``: (B, 3, H, W) images -> (B, D, H/s, W/s) maps.

    Parameters
    ----------
    name : {"vgg16", "resnet18", "resnet34", "resnet50", "resnet101"}
    layer : str or None
        Where to cut (:data:`BACKBONES`): "conv5_3" (default) or "conv4_3" for VGG-16, the
        convolution's output before its ReLU; "layer3" (default) or "layer4" for ResNets.
    weights : None, str or torchvision weights enum
        Passed to ``torchvision.models.get_model``: None for random weights.

    Returns
    -------
    nn.Sequential
        With torchvision's module names (ResNet: ``conv1, bn1, relu, maxpool, layer1...``;
        VGG-16: the indices of ``features``), and the attributes ``out_channels`` (D),
        ``stride`` (s) and ``name``.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r} (or give "
                         "ImageRetrievalModel any nn.Module mapping images to feature maps)")
    layers, default = BACKBONES[name]
    layer = default if layer is None else layer
    if layer not in layers:
        raise ValueError(f"{name} can be cut at {layers}, got layer={layer!r}")
    model = _torchvision().models.get_model(name, weights=weights)
    if name == "vgg16":
        end = _VGG16_CONVOLUTIONS[layer] + 1
        backbone = nn.Sequential(*list(model.features.children())[:end])
        out_channels, stride = model.features[end - 1].out_channels, 8 if layer == "conv4_3" else 16
    else:
        stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        stages = stages[:stages.index(layer) + 1]
        backbone = nn.Sequential(OrderedDict((stage, getattr(model, stage)) for stage in stages))
        last = getattr(model, layer)[-1]
        out_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        stride = 16 if layer == "layer3" else 32
    backbone.out_channels, backbone.stride, backbone.name = out_channels, stride, f"{name}/{layer}"
    return backbone
