"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package lists where each of its public names lives; the module holding a name is
imported the first time the name is read. So ``import vladkit`` (and ``vladkit --help``)
loads none of numpy, scikit-learn, numba or faiss, and ``import vladkit.features.images``
does not load the extractors.
"""

import importlib


def lazy_exports(package, locations):
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` lives in the
    submodule ``locations[name]`` (relative to ``package``)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name):
        module = locations.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value  # once loaded, a plain attribute
        return value

    def __dir__():
        return sorted(set(namespace) | set(locations))

    return __getattr__, __dir__
