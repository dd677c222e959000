"""Every Python snippet of README.md's NetVLAD section runs as written (issue 33: the section
had a snippet that could not run, ``NetVLADEncoder(params, n_jobs=None)``)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (the NetVLAD section's snippets need it: "
                                    "pip install torch==2.14.1 torchvision==0.29.1, then pip install '.[torch]')")
pytest.importorskip("torchvision", reason="torchvision is not installed (the torch extra)")

ROOT = Path(__file__).resolve().parents[1]


def netvlad_snippets():
    """The ```python blocks of the section "## NetVLAD ..." (up to the next "## "), in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## NetVLAD")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def _run(code, cwd, env=None):
    script = Path(cwd) / "snippet.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_the_section_has_snippets():
    snippets = netvlad_snippets()
    assert len(snippets) >= 4
    assert not any("n_jobs=None)" in s and "NetVLADEncoder(params, n_jobs" in s for s in snippets)


def test_the_torch_snippets_run_in_order(tmp_path):
    """The PyTorch snippets share one script, in the README's order (each builds on the
    ones before, as a reader runs them)."""
    code = "\n".join(s for s in netvlad_snippets() if "keras" not in s)
    done = _run(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_keras_snippets_run(tmp_path):
    snippets = [s for s in netvlad_snippets() if "keras" in s]
    if not snippets:
        pytest.skip("the section has no Keras snippet")
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed (the keras extra: pip install '.[keras]')")
    for snippet in snippets:
        done = _run(snippet, tmp_path, env={"KERAS_BACKEND": "torch"})
        assert done.returncode == 0, done.stderr[-3000:]
