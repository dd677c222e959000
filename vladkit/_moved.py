"""The module paths of vladkit 0.1's flat layout, kept working for one release.

vladkit 0.1 kept its modules side by side (``vladkit.index``, ``vladkit.rerank``,
``vladkit.encodings``, ...); they now live in one folder per concept (ARCHITECTURE.md,
"Package layout"). ``import vladkit.index`` and ``from vladkit.index import VectorIndex``
still work: the old path is a proxy module whose attributes are looked up in the modules
that now hold them, and importing it warns once with a :class:`DeprecationWarning` naming
the new path. ``python -m vladkit.cli`` runs the command as ``python -m vladkit`` does.
The aliases go in the next release; ``from vladkit import VectorIndex`` (every name of
``vladkit.__all__``) is the path that stays.

A proxy rather than the module itself under a second name: a module object registered
under two names would have the import system overwrite its ``__spec__``, and a split
module (``vladkit.index`` is now ``retrieval.index`` and ``retrieval.whitening``) has no
single module to alias.
"""

import importlib
import importlib.machinery
import sys
import types
import warnings

#: old module -> the modules that now hold its names, searched in order.
MOVED = {
    "vladkit.budget": ("vladkit.pipeline.budget",),
    "vladkit.cli": ("vladkit.app.cli",),
    "vladkit.demo": ("vladkit.app.demo",),
    "vladkit.dsift": ("vladkit.features.dsift",),
    "vladkit.encodings": ("vladkit.pipeline.encodings", "vladkit.pipeline.recipe"),
    "vladkit.evaluation": ("vladkit.retrieval.metrics", "vladkit.retrieval.ground_truth"),
    "vladkit.functional": ("vladkit.encoders.functional",),
    "vladkit.image_encoder": ("vladkit.pipeline.image_encoder",),
    "vladkit.image_header": ("vladkit.features.image_header",),
    "vladkit.images": ("vladkit.features.images",),
    "vladkit.index": ("vladkit.retrieval.index", "vladkit.retrieval.whitening", "vladkit.retrieval.index_files"),
    "vladkit.jobs": ("vladkit.pipeline.jobs",),
    "vladkit.normalize": ("vladkit.encoders.normalize",),
    "vladkit.rerank": ("vladkit.retrieval.rerank",),
    "vladkit.serve": ("vladkit.app.serve.web", "vladkit.app.serve.service", "vladkit.app.serve.server"),
    "vladkit.sharded": ("vladkit.pipeline.sharded",),
    "vladkit.spatial": ("vladkit.retrieval.spatial",),
    "vladkit.spatial_augmentation": ("vladkit.features.spatial_augmentation",),
}


def _caller_stacklevel():
    """The ``stacklevel`` that points a warning at the ``import`` statement, past the
    import system's frames, so that Python's default filter shows it in ``__main__``."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            pass  # warnings.warn skips the import system's frames itself, uncounted
        elif name in (__file__, importlib.__file__):
            level += 1
        else:
            return level
        frame = frame.f_back
    return level


class _MovedModule(types.ModuleType):
    """The old path: every attribute is read from the modules that hold it now."""

    def __init__(self, name, targets):
        super().__init__(name, f"Deprecated alias of {', '.join(targets)}.")
        self.__targets = targets

    def __getattr__(self, attribute):
        if attribute.startswith("__"):  # the alias's own (__file__, __path__, ...): it has none
            raise AttributeError(attribute)
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {self.__name__!r} (now {self.__targets[0]!r}) has no attribute {attribute!r}")

    def __dir__(self):
        return sorted({name for target in self.__targets for name in dir(importlib.import_module(target))})


class _MovedLoader:  # the loader protocol (not importlib.abc: 15 ms to import, on every --help)
    def __init__(self, targets):
        self.targets = targets

    def create_module(self, spec):
        return _MovedModule(spec.name, self.targets)

    def exec_module(self, module):
        pass

    def is_package(self, name):
        return False

    def get_code(self, name):
        """What ``python -m OLD_PATH`` runs: the new module, as ``__main__``."""
        return compile(f"import runpy\nrunpy.run_module({self.targets[0]!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{name}: moved to {self.targets[0]}>", "exec")


class MovedModuleFinder:  # the meta path finder protocol
    """Finds the old paths of :data:`MOVED` (installed on ``sys.meta_path`` by
    ``import vladkit``)."""

    def find_spec(self, name, path=None, target=None):
        targets = MOVED.get(name)
        if targets is None:
            return None
        warnings.warn(f"{name} is deprecated and goes in the next vladkit release: import from {targets[0]} "
                      f"(or the public names from vladkit)", DeprecationWarning, stacklevel=_caller_stacklevel())
        return importlib.machinery.ModuleSpec(name, _MovedLoader(targets))


def install():
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
