"""The sphinx-gallery examples (docs/examples/plot_*.py) run to completion.

Each runs as its own process, as sphinx-gallery's build does, with matplotlib's Agg
backend; each must stay under a minute on 2 cores (issue 34), checked loosely here (a
5-minute timeout: the test machine may be busy)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
SCRIPTS = sorted(EXAMPLES.glob("plot_*.py"))

# What each example needs beyond vladkit's core dependencies: matplotlib for its figures,
# scikit-image for most of the sample photos (vladkit.datasets.demo_photos). The NetVLAD
# example skips itself, with a message, without torch.
NEEDS = ("matplotlib", "skimage")
MISSING = [name for name in NEEDS if importlib.util.find_spec(name) is None]


def test_the_gallery_has_its_examples():
    assert {script.name for script in SCRIPTS} >= {
        "plot_classify_pipeline.py", "plot_retrieval_bytes.py", "plot_near_duplicates_rerank.py",
        "plot_netvlad_training.py", "plot_memory_budget.py"}


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"the gallery examples need {', '.join(MISSING)} "
                    "(pip install 'vladkit[demo]')")
@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_example_runs(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert result.stdout.strip(), "an example prints its key numbers"
