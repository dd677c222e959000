"""README.md is the landing page: short, and every command and snippet in it is run, by this
test or by CI, so none goes stale again (issue 34)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block):
    """The command lines of a bash block, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def test_readme_fits_on_a_screen_or_two():
    assert len(README.splitlines()) <= 200


def test_python_snippets_run(tmp_path):
    pytest.importorskip("skimage", reason="the quickstart's photos come from scikit-image (the demo extra)")
    for number, code in enumerate(blocks("python")):
        script = tmp_path / f"snippet{number}.py"
        script.write_text(code, encoding="utf-8")
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"README snippet {number}:\n{code}\n{done.stderr[-3000:]}"


def test_every_shell_command_is_run_by_ci_or_a_test():
    """Install and docs commands are .ci/run's own lines; `python -m pytest` is its test
    command; `vladkit demo` runs in tests/test_retrieval_cli.py (the full demo)."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_lines = {line.strip() for line in ci.splitlines()}
    demo_test = (ROOT / "tests" / "test_retrieval_cli.py").read_text(encoding="utf-8")
    shell = [line for block in blocks("bash") for line in commands(block)]
    assert shell, "README has no shell commands"
    for line in shell:
        if line == "vladkit demo":
            assert 'main(["demo"' in demo_test
        elif line.startswith("python -m pip install"):
            # CI installs the same requirement, perhaps with more extras in one line.
            assert any(c.startswith("python -m pip install") and _packages(line) <= _packages(c)
                       for c in ci_lines), line
        else:
            assert line in ci_lines, f"{line!r} is not run by .ci/run"


def _packages(line):
    """The requirements of a pip install line, extras split apart: '.[a,b]' -> {'.[a]', '.[b]'}."""
    found = set()
    for word in line.split()[4:]:
        word = word.strip("\"'")
        match = re.fullmatch(r"(.*)\[(.*)\]", word)
        if match:
            found |= {f"{match[1]}[{extra}]" for extra in match[2].split(",")}
        else:
            found.add(word)
    return found
