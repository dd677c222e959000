"""The 15-Scene comparison's --quick path, so the script does not rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scene15"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"15-Scene not found at {DATA}")
def test_quick_benchmark_runs_and_resumes(tmp_path):
    def bench(out):
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_scene15.py"), "--quick", "--per-class", "2",
             "--data", str(DATA), "--out", str(out), "--cache", str(tmp_path / "cache")],
            capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout, (out / "scene15.md").read_text()

    _, table = bench(tmp_path / "first")
    counts = {name: table.count(f"| {name} ") for name in ("BoF", "LLC", "VLAD", "SV", "FV")}
    assert counts == {"BoF": 4, "LLC": 4, "VLAD": 8, "SV": 4, "FV": 12}, counts
    assert table.count("+ xy") == 10
    # the mirror-averaged rows: the K=8 Fisher vectors, with and without positions and pyramid
    assert table.count(" + mirror") == 4
    assert "balanced accuracy" in table and "%" in table

    # A run stopped mid-way: one row's vectors cut short (its record says 10 images, the
    # file holds all), another's test vectors and both rows' results gone. The rerun
    # resumes them from the cache, takes the rest as they are, and gives the same table.
    cache = tmp_path / "cache"
    meta = cache / "FV_K-8_PCA-32_xy_mirror-train.json"
    meta.write_text(meta.read_text().replace('"n_rows": 30', '"n_rows": 10'))
    for path in cache.glob("LLC_K-200-test.*"):
        path.unlink()
    results = json.loads((cache / "results.json").read_text())
    (cache / "results.json").write_text(json.dumps(
        {k: v for k, v in results.items() if not k.startswith(("LLC K=200", "FV K=8 PCA-32 + xy + mirror"))}))
    stdout, again = bench(tmp_path / "second")
    assert "resuming at image 10" in stdout and "(from the cache)" in stdout
    assert "pass 1" not in stdout  # every vocabulary was cached
    rows = [line.split("|")[1:5] for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == [line.split("|")[1:5] for line in again.splitlines() if line.startswith("| ") and "%" in line]
