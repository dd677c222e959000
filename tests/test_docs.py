"""The documentation site (docs/, issue 34): the API reference lists every public name, every
Python block of the user guide runs as written, and (slow, where Sphinx is installed) the
site builds with no warnings."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vladkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDE = DOCS / "guide"


def _api_source():
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted((DOCS / "api").glob("*.*"))
                     if path.suffix in (".rst", ".md"))


def _listed_names(text):
    """Names given to the API reference's ``autosummary`` tables and ``py:data`` entries."""
    names = set(re.findall(r"^\.\. py:data:: (\S+)", text, flags=re.M))
    for table in re.findall(r"^\.\. autosummary::\n((?:[ \t]+.*\n|[ \t]*\n)+)", text, flags=re.M):
        names.update(line.strip() for line in table.splitlines()
                     if line.strip() and not line.strip().startswith(":"))
    return names


def _modules(text):
    """Each listed name with the ``.. module::`` it is listed under."""
    found, module = set(), None
    for block in re.split(r"^(\.\. (?:module|currentmodule):: \S+)\n", text, flags=re.M):
        match = re.match(r"\.\. (?:module|currentmodule):: (\S+)$", block)
        if match:
            module = match.group(1)
        elif module is not None:
            found.update((module, name) for name in _listed_names(block))
    return found


def test_api_reference_lists_every_public_name():
    listed = _modules(_api_source())
    missing = [name for name in vladkit.__all__ if ("vladkit", name) not in listed]
    assert not missing, f"vladkit names missing from docs/api: {missing}"


def test_api_reference_lists_every_netvlad_name():
    # The names are read from the source, so this runs without torch too.
    source = (ROOT / "vladkit" / "netvlad" / "__init__.py").read_text(encoding="utf-8")
    names = re.findall(r'"(\w+)"', re.search(r"__all__ = \[(.*?)\]", source, flags=re.S).group(1))
    assert len(names) >= 10
    listed = _modules(_api_source())
    missing = [name for name in names if ("vladkit.netvlad", name) not in listed]
    assert not missing, f"vladkit.netvlad names missing from docs/api: {missing}"
    assert ("vladkit.keras", "NetVLAD") in listed


def test_api_reference_names_exist():
    """Every listed name is real (a renamed function would otherwise be found only by the build)."""
    for module, name in _modules(_api_source()):
        if module != "vladkit":
            continue
        assert name in vladkit.__all__, f"docs/api lists vladkit.{name}, which vladkit does not export"


# --- the user guide's code -----------------------------------------------------------------

#: Pages whose Python blocks are not run, and why (each needs what a test cannot have).
SKIPPED_PAGES = {}


def _python_blocks(page):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def _pages_with_code():
    return sorted(path.name for path in GUIDE.glob("*.md") if _python_blocks(path))


def test_the_guide_has_code_and_every_skip_names_a_page():
    pages = _pages_with_code()
    assert len(pages) >= 5
    assert set(SKIPPED_PAGES) <= set(pages), "a skipped page has no Python block any more"


def _run(code, cwd, env=None):
    script = Path(cwd) / "page.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg",
                                            **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_code())
def test_guide_page_code_runs(page, tmp_path):
    """A page's Python blocks, concatenated in order (each builds on the ones before, as a
    reader runs them), in an empty folder."""
    if page in SKIPPED_PAGES:
        pytest.skip(SKIPPED_PAGES[page])
    blocks = _python_blocks(GUIDE / page)
    if any("torch" in block or "vladkit.netvlad" in block for block in blocks):
        pytest.importorskip("torch", reason="torch is not installed (the torch extra)")
        pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra)")
    if any("skimage" in block for block in blocks):
        pytest.importorskip("skimage", reason="scikit-image is not installed (the demo extra)")
    keras_blocks = [block for block in blocks if "keras" in block]
    code = "\n".join(block for block in blocks if block not in keras_blocks)
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if keras_blocks and importlib.util.find_spec("keras") is not None:
        for block in keras_blocks:
            done = _run(block, tmp_path, env={"KERAS_BACKEND": "torch"})
            assert done.returncode == 0, done.stderr[-3000:]

