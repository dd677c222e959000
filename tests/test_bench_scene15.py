"""The 15-Scene comparison's --quick path, so the script does not rot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "scene15"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "train").is_dir(), reason=f"15-Scene not found at {DATA}")
def test_quick_benchmark_runs_and_resumes(tmp_path):
    def bench(out):
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "bench_scene15.py"), "--quick", "--per-class", "2",
             "--data", str(DATA), "--out", str(out), "--cache", str(tmp_path / "cache"), "--splits", "2"],
            capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout, (out / "scene15.md").read_text()

    stdout, table = bench(tmp_path / "first")
    # one descriptor sample per set of bin sizes: PHOW's for most rows, with 3-pixel bins for one
    assert "(bin sizes 4/6/8/10)" in stdout and "(bin sizes 3/4/6/8/10)" in stdout
    counts = {name: table.count(f"| {name} ") for name in ("BoF", "KCB", "LLC", "VLAD", "SV", "FV")}
    assert counts == {"BoF": 4, "KCB": 4, "LLC": 4, "VLAD": 8, "SV": 4, "FV": 16}, counts
    # the kernel codebook's sigma, estimated once per vocabulary on the sample and cached
    sigmas = {path.name: json.loads(path.read_text())["sigma"] for path in (tmp_path / "cache").glob("sigma-*.json")}
    assert sorted(sigmas) == ["sigma-KCB_K-100_Hellinger.json", "sigma-KCB_K-200_Hellinger.json"], sigmas
    assert all(0 < sigma < 2 for sigma in sigmas.values()), sigmas  # unit-norm RootSIFT: distances below 2
    assert table.count("+ xy") == 10
    assert table.count("| FV K=8 PCA-32 + 3px bins") == 4  # with and without the mirror and the pyramid
    # the mirror-averaged rows: the K=8 Fisher vectors (plain, + xy, + 3px bins), with and without pyramid
    assert table.count(" + mirror") == 6
    assert "balanced accuracy" in table and "%" in table
    assert "| random splits |" in table
    assert all(" ± " in line for line in table.splitlines() if line.startswith("| ") and "%" in line)

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
    rows = [line.split("|")[1:6] for line in table.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == [line.split("|")[1:6] for line in again.splitlines() if line.startswith("| ") and "%" in line]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scene15", ROOT / "benchmarks" / "bench_scene15.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_random_splits_draw_the_per_class_counts_from_all_images():
    bench = load_bench()
    y = np.repeat([0, 1, 2], [7, 5, 9])
    n_train = np.array([3, 2, 4])
    draws = set()
    for index in range(5):
        train, test = bench.random_split(y, n_train, seed=0, index=index)
        assert np.array_equal(np.bincount(y[train]), n_train)
        assert sorted(np.concatenate([train, test])) == list(range(len(y)))
        # Split i is the same draw in every run.
        assert np.array_equal(bench.random_split(y, n_train, seed=0, index=index)[0], train)
        draws.add(tuple(train))
    assert len(draws) > 1


def test_pooled_kernel_is_the_kernel_over_train_then_test():
    bench = load_bench()
    X = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    train, test = X[:4], X[4:]
    K = bench.pooled_kernel(train @ train.T, test @ train.T, test @ test.T)
    np.testing.assert_allclose(K, X @ X.T, rtol=1e-6)


def test_format_splits_is_mean_and_sample_std_in_percent():
    bench = load_bench()
    assert bench.format_splits([0.8, 0.9]) == f"85.0 ± {100 * np.std([0.8, 0.9], ddof=1):.1f}"
    assert bench.format_splits([0.875]) == "87.5"  # no spread from one split
