"""NetVLAD in PyTorch: the trainable layer (and, in ``training``, its training).

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
        "vladkit.netvlad needs PyTorch, which is not installed. Install the CPU build first, "
        "then vladkit's torch extra:\n"
        "    pip install torch==2.13.0\n"
        '    pip install "vladkit[torch]"     (or, from a source tree: pip install ".[torch]")\n'
        "A bare `pip install torch` may download a CUDA build of several GB. "
        "Inference without torch: vladkit.encoders.netvlad.NetVLADEncoder."
    ) from error

from .layer import NetVLAD

__all__ = ["NetVLAD"]
