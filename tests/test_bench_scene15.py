"""The 15-Scene comparison's --quick path, so the script does not rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scene15"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"15-Scene not found at {DATA}")
def test_quick_benchmark_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scene15.py"), "--quick", "--per-class", "2",
         "--data", str(DATA), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "scene15.md").read_text()
    counts = {name: table.count(f"| {name} ") for name in ("BoF", "LLC", "VLAD", "SV", "FV")}
    assert counts == {"BoF": 2, "LLC": 4, "VLAD": 4, "SV": 4, "FV": 12}, counts
    assert table.count("+ xy") == 6
    # the mirror-averaged rows: the K=8 Fisher vectors, with and without positions and pyramid
    assert table.count(" + mirror") == 4
    assert "balanced accuracy" in table and "%" in table
