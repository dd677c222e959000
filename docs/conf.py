"""Sphinx configuration of vladkit's documentation site.

Build (from the repository root, after ``pip install ".[docs]"``)::

    python -m sphinx -W -b html docs docs/_build/html
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# vladkit.keras needs a Keras backend; Keras's default (TensorFlow) is rarely installed.
if "KERAS_BACKEND" not in os.environ:
    os.environ["KERAS_BACKEND"] = "torch" if importlib.util.find_spec("torch") else "jax"
# Gallery examples draw with matplotlib, off screen.
os.environ.setdefault("MPLBACKEND", "Agg")

import vladkit  # noqa: E402

project = "vladkit"
author = "vladkit developers"
copyright = "vladkit developers"
release = vladkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinxarg.ext",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5",
                    "examples"]

# -- Warnings: a broken cross-reference fails the build (-W) -----------------------------
nitpicky = True
# Only numpydoc type words and shapes, which are not Python objects; never our own names.
nitpick_ignore = [
    ("py:class", name) for name in (
        "array-like", "array_like", "ndarray", "optional", "default", "callable",
        "path-like", "os.PathLike", "file-like", "scalar", "iterable", "sequence",
        "mapping", "of", "or", "shape", "int or None", "None",
    )
]
nitpick_ignore_regex = [
    # External objects: the build reads no intersphinx inventory (it must not need the
    # network), so Python's, numpy's, scikit-learn's, torch's ... names are not linked.
    (r"py:.*", r"(numpy|np|scipy|sklearn|torch|torchvision|keras|faiss|dask|distributed|"
               r"pathlib|os|typing|collections|concurrent|threading|multiprocessing|io|"
               r"argparse|starlette|PIL|cv2|numba|json|enum|dataclasses|abc)(\..*)?"),
    # Python's standard library (tracemalloc, weakref, ...): external too.
    (r"py:.*", r"(%s)(\..*)?" % "|".join(sorted(sys.stdlib_module_names))),
    (r"py:.*", r"(int|float|str|bytes|bool|list|tuple|dict|set|frozenset|object|type|slice|"
               r"range|Exception|ValueError|TypeError|OSError|RuntimeError|KeyError|"
               r"ImportError|IndexError|UserWarning|Warning|Path|PathLike|Iterable|Iterator|"
               r"Sequence|Mapping|Callable|Any|Generator|Module|Tensor|Self|complex|"
               r"memoryview|bytearray|property|classmethod|staticmethod|NoneType)"),
    ("py:class", r"\(.*\)"),            # shapes: (n, D), (n_images, K * D)
    ("py:class", r"\d.*"),              # numbers in shapes and defaults
    ("py:class", r".*['\"].*"),         # string literals in types: {'l2', 'power'}
    ("py:class", r"\{.*|.*\}"),         # set-of-values types: {"a", "b"}
]

# -- autodoc / autosummary / numpydoc -------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"          # types come from the numpydoc "Parameters" sections
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_xref_aliases = {
    "ndarray": "numpy.ndarray",
    "Path": "pathlib.Path",
    "DataFrame": "pandas.DataFrame",
}
numpydoc_xref_ignore = {
    "of", "or", "optional", "default", "shape", "array-like", "array_like", "callable",
    "path-like", "file-like", "scalar", "iterable", "sequence", "mapping", "the", "a",
    "an", "one", "per", "each", "with", "and", "to", "in", "n", "D", "K", "int,",
}


# -- MyST -----------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- sphinx-gallery -------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "plot_gallery": "True",
}

# -- HTML -----------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"vladkit {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = []
html_show_sourcelink = False


# -- Cross-references to a public name through the module that defines it --------------
# Docstrings may name an object where it is defined (``vladkit.features.images.read_image``);
# its page is the public name's (``vladkit.read_image``). Resolve such a reference to that
# page when the two are the same object; anything else stays a broken reference (-W).
def _public_target(target):
    if not target.startswith("vladkit.") or target.count(".") < 2:
        return None
    parts = target.split(".")
    for cut in range(len(parts) - 1, 1, -1):
        module_name, attrs = ".".join(parts[:cut]), parts[cut:]
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in attrs[:1]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        for public in ("vladkit", "vladkit.netvlad", "vladkit.keras"):
            try:
                package = importlib.import_module(public)
            except ImportError:
                continue
            for name in getattr(package, "__all__", ()) or ["NetVLAD"]:
                if getattr(package, name, None) is obj:
                    return ".".join([public, name, *attrs[1:]])
        return None
    return None


def _resolve_public(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = _public_target(node.get("reftarget", ""))
    if target is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target,
                               node, contnode)


# A reference to an internal vladkit object (a private helper, a module without a page of
# its own) is shown as code, not linked, when that object exists; a reference to a name
# that does not exist anywhere (a typo, a renamed function) still fails the build.
def _vladkit_object_exists(target, source):
    candidates = [target]
    if not target.startswith("vladkit."):
        # A short name, relative to the docstring's own module or class.
        documented = source.rpartition("docstring of ")[2].strip()
        parts = documented.split(".")
        candidates = [".".join(parts[:cut] + [target]) for cut in range(len(parts), 0, -1)]
    for candidate in candidates:
        if not candidate.startswith("vladkit"):
            continue
        parts = candidate.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return True
    return False


def _internal_as_code(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    if _vladkit_object_exists(node.get("reftarget", ""), node.source or ""):
        return contnode
    return None


# The command line's reference is generated from its real parser; the descriptions and
# epilogs it prints preformatted (RawDescriptionHelpFormatter: lists, examples) are shown
# as literal blocks, as ``vladkit COMMAND --help`` prints them, rather than read as reST.
def _cli_parser():
    import argparse
    import textwrap

    from vladkit.app.cli import build_parser

    def literal(text):
        if not text or "\n" not in text:
            return text
        return "::\n\n" + textwrap.indent(text, "    ")

    def walk(parser):
        parser.description = literal(parser.description)
        parser.epilog = literal(parser.epilog)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    parser = build_parser()
    walk(parser)
    return parser


_cli_module = types.ModuleType("vladkit_docs_cli")
_cli_module.build_parser = _cli_parser
sys.modules["vladkit_docs_cli"] = _cli_module


def _skip_foreign_members(app, what, name, obj, skip, options):
    # Inherited members that vladkit does not define (scikit-learn's get_params,
    # set_output, set_*_request; torch's and Keras's Module/Layer API) are theirs to document.
    module = getattr(obj, "__module__", None)
    if isinstance(obj, (property, classmethod, staticmethod)):
        module = getattr(getattr(obj, "fget", None) or getattr(obj, "__func__", None),
                         "__module__", module)
    if module is not None and not str(module).startswith("vladkit"):
        return True
    return None


# A public constant re-exported by a package (``vladkit.netvlad.BACKBONES``) has its ``#:``
# doc comment where it is defined (``vladkit/netvlad/backbones.py``): use that one.
def _data_doc_from_definition(app, what, name, obj, options, lines):
    if what not in ("data", "attribute"):
        return
    import inspect

    own = [line for line in lines if line.strip() and not line.lstrip().startswith("..")]
    inherited = inspect.cleandoc(type(obj).__doc__ or "")   # dict's, str's: not the constant's
    if own and "\n".join(own).strip() != "\n".join(
            line for line in inherited.splitlines() if line.strip()).strip():
        return
    from sphinx.pycode import ModuleAnalyzer

    package, _, attr = name.rpartition(".")
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith(package + ".") or getattr(module, attr, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # noqa: BLE001 - a module without source: nothing to read
            continue
        if ("", attr) in docs:
            lines[:] = list(docs[("", attr)])
            return


def setup(app):
    # Before numpydoc's own handler (priority 500), which then formats the comment.
    app.connect("autodoc-process-docstring", _data_doc_from_definition, priority=400)
    app.connect("missing-reference", _resolve_public)
    app.connect("missing-reference", _internal_as_code, priority=900)
    app.connect("autodoc-skip-member", _skip_foreign_members)
