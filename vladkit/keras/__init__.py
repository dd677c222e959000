"""NetVLAD as a Keras 3 layer (:class:`NetVLAD`), written with ``keras.ops`` only, so it
runs on any Keras backend (JAX, PyTorch, TensorFlow).

This subpackage needs Keras 3 and one backend; ``import vladkit`` never imports it.
Without Keras 3, importing ``vladkit.keras`` raises ImportError with the install
instructions. The layer reads and writes the torch layer's parameters
(:class:`vladkit.encoders.netvlad_params.NetVLADParams`, files from ``save_netvlad``), so a
layer trained in PyTorch runs in Keras, and back.
"""

import importlib as _importlib

_INSTALL = (
    'Install vladkit\'s keras extra and a backend:\n'
    '    pip install "vladkit[keras]" jax jaxlib     (JAX on the CPU; KERAS_BACKEND=jax)\n'
    '    pip install "vladkit[keras,torch]"          (PyTorch; KERAS_BACKEND=torch)\n'
    '(from a source tree: pip install ".[keras]"). Keras picks its backend from the '
    'KERAS_BACKEND environment variable when it is first imported.'
)

try:
    _keras = _importlib.import_module("keras")
except ImportError as error:  # pragma: no cover - exercised only where keras is absent
    raise ImportError(f"vladkit.keras needs Keras 3, which is not installed. {_INSTALL}") from error

if not hasattr(_keras, "ops"):  # pragma: no cover - Keras 2 (tf.keras era)
    raise ImportError(f"vladkit.keras needs Keras 3 (keras.ops); the installed keras is "
                      f"{getattr(_keras, '__version__', 'unknown')}. {_INSTALL}")

from .netvlad import NetVLAD  # noqa: E402

__all__ = ["NetVLAD"]
