"""The package layout (ARCHITECTURE.md, "Package layout"): import-linter's contracts in
pyproject.toml hold, and break when a forbidden import is added; modules stay short; the
public names and vladkit 0.1's module paths keep working."""

import ast
import importlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import vladkit
from vladkit._moved import MOVED

importlinter = pytest.importorskip("importlinter", reason="import-linter is in the test extra")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vladkit"

LAYERS = "Each folder imports only the folders below it"
NO_ROOT = "No module imports the package's own __init__"
ACYCLIC = "No import cycles, at any depth of the package"


def _lint(root):
    """Run import-linter with the repository's contracts on the package under ``root``
    (the import graph is built from the files there), in a fresh interpreter."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_the_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for contract in (LAYERS, NO_ROOT, ACYCLIC):
        assert contract in result.stdout


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the package's sources and pyproject.toml, to add forbidden imports to."""
    root = tmp_path_factory.mktemp("layout")
    shutil.copytree(PACKAGE, root / "vladkit", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


@pytest.mark.parametrize("module, line, broken", [
    # a lower layer importing a higher one
    ("features/images.py", "from ..encoders import bof", LAYERS),
    ("encoders/bof.py", "from ..pipeline import budget", LAYERS),
    ("vocabulary/__init__.py", "from ..retrieval import spatial", LAYERS),
    ("pipeline/jobs.py", "from ..app import errors", LAYERS),
    ("retrieval/spatial.py", "from ..app import cli", LAYERS),
    # kernels import nothing from vladkit
    ("kernels/encoding.py", "from .._util import threads", LAYERS),
    # independent siblings
    ("features/images.py", "from ..vocabulary import files", LAYERS),
    # the package's own __init__
    ("pipeline/sharded.py", "from .. import __version__", NO_ROOT),
    # a cycle inside a layer (sharded imports recipe)
    ("pipeline/recipe.py", "from . import sharded", ACYCLIC),
])
def test_a_forbidden_import_breaks_the_contracts(package_copy, module, line, broken):
    path = package_copy / "vladkit" / module
    original = path.read_text(encoding="utf-8")
    try:
        # At the end of the module, where it cannot change what the module does.
        path.write_text(original + f"\n{line}  # added by test_layout\n", encoding="utf-8")
        result = _lint(package_copy)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode == 1, result.stdout + result.stderr
    # The contract is reported broken (an upward import usually makes a cycle too), and
    # the report names the line that broke it.
    report = " ".join(result.stdout.split())  # the summary wraps long contract names
    assert f"{broken}" in report and "BROKEN" in report, result.stdout
    name = module[:-3].replace("/", ".").removesuffix(".__init__")
    assert f"vladkit.{name}" in report or f".{name.rpartition('.')[2]} " in report, result.stdout


#: A module over this many lines must say why at its top (one concept that splitting
#: would scatter): the phrase below, in its docstring.
MAX_LINES = 600
LONG_MODULE_NOTE = "over 600 lines on purpose"


def test_modules_are_short_or_say_why():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES and LONG_MODULE_NOTE not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, long


def test_every_public_name_is_where_users_find_it():
    for name in vladkit.__all__:
        assert getattr(vladkit, name) is not None, name
    assert set(vladkit.__all__) <= set(dir(vladkit))


def test_import_vladkit_stays_lazy():
    code = "import sys, vladkit; print(sorted({'numpy', 'sklearn', 'numba', 'faiss', 'cv2'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


#: vladkit 0.1's flat modules and their ``__all__``: still importable from the old path,
#: with a DeprecationWarning naming the new one, until the next release.
FLAT_LAYOUT_NAMES = {
    "vladkit.budget": ["DEFAULT_MAX_MEMORY", "ImageBatch", "encoder_memory", "iter_batches", "parse_memory"],
    "vladkit.cli": ["build_parser", "main"],
    "vladkit.demo": ["DemoResult", "run_demo"],
    "vladkit.dsift": ["dense_grid", "dense_sift", "dense_sift_pieces"],
    "vladkit.encodings": ["EncodedImages", "EncodingsFileError", "Recipe", "load_encodings", "load_vocabulary_file",
                          "locate_vocabulary"],
    "vladkit.evaluation": ["GroundTruth", "average_precision", "folder_ground_truth", "folder_roots",
                           "holidays_ground_truth", "mean_average_precision", "recall_at_k", "retrieval_ground_truth"],
    "vladkit.functional": ["fisher_encode", "vlad_encode"],
    "vladkit.image_encoder": ["ImageEncoder", "encode_batches", "sample_features"],
    "vladkit.image_header": ["CorruptImageError", "HeaderError", "ImageHeader", "read_header"],
    "vladkit.images": ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageReadError", "ImageSource", "list_images",
                       "read_image", "read_size"],
    "vladkit.index": ["IndexFileError", "PCAWhitening", "VectorIndex"],
    "vladkit.jobs": ["EncodeResult", "encode_images", "job_folder", "sample_descriptors"],
    "vladkit.normalize": ["NORM_FLOOR", "l1_normalize", "l2_normalize", "intra_normalize", "power_normalize"],
    "vladkit.rerank": ["FeatureStore", "RerankResult", "default_rerank_extractor", "rerank", "write_feature_store"],
    "vladkit.serve": ["SearchService", "ServiceError", "create_app", "run", "serve_in_thread"],
    "vladkit.sharded": ["ShardedEncodings", "SHARDED_FORMAT"],
    "vladkit.spatial": ["Verification", "default_threshold", "match_descriptors", "spatial_score", "verify"],
    "vladkit.spatial_augmentation": ["N_POSITION_DIMS", "SpatialAugmentation", "augment_positions"],
    # Now packages: their public names are re-exported, no warning.
    "vladkit.features": ["DenseSIFT", "ImageSkippedWarning", "LocalFeatures", "SIFT", "root_sift"],
    "vladkit.vocabulary": ["DescriptorSampler", "GMMVocabulary", "KMeansVocabulary", "VocabularyFileError",
                           "load_vocabulary"],
    "vladkit.datasets": ["ATTACKS", "NearDuplicateSet", "demo_photos", "labelled_images", "near_duplicate_set"],
}


@pytest.mark.parametrize("old", sorted(FLAT_LAYOUT_NAMES))
def test_the_flat_layouts_paths_still_work(old):
    if old in ("vladkit.serve",):
        pytest.importorskip("uvicorn", reason="vladkit.serve needs the serve extra")
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                    and w.filename == __file__]
    if old in MOVED:
        # Pointed at this file's import, with the new path.
        assert len(deprecations) == 1 and MOVED[old][0] in deprecations[0], [str(w.message) for w in caught]
    else:
        assert not deprecations
    for name in FLAT_LAYOUT_NAMES[old]:
        value = getattr(module, name)
        new_homes = [importlib.import_module(target) for target in MOVED.get(old, ())]
        assert not new_homes or any(getattr(home, name, None) is value for home in new_homes), name


def test_python_m_runs_the_command_by_either_path():
    for module in ("vladkit", "vladkit.cli"):
        result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == f"vladkit {vladkit.__version__}", \
            result.stdout + result.stderr


def test_the_deprecated_paths_cover_every_module_they_name():
    for old, targets in MOVED.items():
        assert old not in sys.modules or not hasattr(sys.modules[old], "__file__"), old
        for target in targets:
            assert (PACKAGE.parent / (target.replace(".", "/") + ".py")).is_file(), target
