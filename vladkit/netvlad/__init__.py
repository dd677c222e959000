"""NetVLAD in PyTorch: the trainable layer, the modules of an image-retrieval network around
it (GeM, PCA whitening, L2 normalisation, :class:`ImageRetrievalModel`, torchvision
backbones), and (in ``training``) its training.

This subpackage needs torch; ``import vladkit`` never imports it. Without torch, importing
``vladkit.netvlad`` raises ImportError with the install instructions. Inference without
torch is :class:`vladkit.encoders.netvlad.NetVLADEncoder`, which reads what
:meth:`NetVLAD.to_params` gives (saved with ``save_netvlad``).
"""

import importlib as _importlib

try:
    _importlib.import_module("torch")
except ImportError as error:  # pragma: no cover - exercised only where torch is absent
    raise ImportError(
        "vladkit.netvlad needs PyTorch, which is not installed. Install torch and a "
        "torchvision built for it first, then vladkit's torch extra:\n"
        "    pip install torch==2.14.1 torchvision==0.29.1\n"
        '    pip install "vladkit[torch]"     (or, from a source tree: pip install ".[torch]")\n'
        "A bare `pip install torch` may download a CUDA build of several GB (PyTorch's own "
        "index has CPU builds: pytorch.org, 'Get Started'). "
        "Inference without torch: vladkit.encoders.netvlad.NetVLADEncoder."
    ) from error

from .backbones import BACKBONES, build_backbone
from .layer import NetVLAD
from .modules import GeM, ImageRetrievalModel, L2Normalize, PCAWhitening
from .images import ImageGroupsDataset
from .mining import HardNegativeMiner
from .image_training import init_netvlad_from_images, load_image_model, save_image_model, train_on_images
from .ports import model_from_pytorch_netvlad, netvlad_from_pytorch_netvlad

__all__ = ["NetVLAD", "GeM", "PCAWhitening", "L2Normalize", "ImageRetrievalModel", "build_backbone",
           "BACKBONES", "netvlad_from_pytorch_netvlad", "model_from_pytorch_netvlad",
           "ImageGroupsDataset", "HardNegativeMiner", "init_netvlad_from_images", "train_on_images",
           "save_image_model", "load_image_model"]
