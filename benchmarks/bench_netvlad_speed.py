"""Torch-free NetVLAD inference speed against soft-assignment VLAD, side by side in one run.

    python benchmarks/bench_netvlad_speed.py [--n 10000] [-k 64 256] [--threads 2] [--repeats 15]

One image of N real dense RootSIFT descriptors from 15-Scene (``../shared/data/scene15``;
synthetic clustered descriptors if it is absent, said in the output), D = 128, K words
from k-means on them. Timed, each the median of --repeats runs, the runs interleaved so
that load on the machine hits both alike:

* ``NetVLADEncoder`` with v2 parameters (bias; ``init_netvlad`` from the same words) and
  with v1 parameters (no bias), every option at its default (input normalisation, intra
  normalisation, L2);
* ``VLADEncoder(assignment="soft", alpha=<the v2 alpha>, power=None)``: the same
  mathematics as the v2 layer on these unit-norm descriptors.

The issue's target: NetVLAD within 1.5x of soft VLAD at the same N, D, K.
:func:`netvlad_speed` returns the rows (``benchmarks/bench_netvlad.py`` may call it).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

import vladkit  # noqa: F401  (first: it sets the BLAS / OpenMP thread waits before numpy loads)

import numpy as np

from vladkit import DenseSIFT, KMeansVocabulary, NetVLADEncoder, VLADEncoder, init_netvlad
from vladkit._util.threads import limit_threads

SCENE15 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "scene15")


def rootsift_descriptors(n, root=SCENE15):
    """(n, 128) float32 dense RootSIFT rows of the first 15-Scene training images of
    several classes (DenseSIFT defaults: step 4, sizes 4-10), and a description of them;
    synthetic clustered unit-norm rows when 15-Scene is absent."""
    paths = sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
    if not paths:
        rng = np.random.default_rng(0)
        centers = np.abs(rng.normal(0, 1, (512, 128)))
        X = np.abs(centers[rng.integers(0, 512, n)] + 0.3 * rng.standard_normal((n, 128)))
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        return X.astype(np.float32), f"synthetic (15-Scene not found at {os.path.abspath(root)})"
    # One image from each class in turn: the rows then cover several kinds of scene.
    by_class = {}
    for path in paths:
        by_class.setdefault(os.path.basename(os.path.dirname(path)), []).append(path)
    order = [p for group in zip(*by_class.values()) for p in group]
    extractor = DenseSIFT(root=True, n_jobs=2)
    parts, total, used = [], 0, 0
    for path in order:
        parts.append(extractor.transform([path])[0].descriptors)
        total += len(parts[-1])
        used += 1
        if total >= n:
            break
    X = np.ascontiguousarray(np.concatenate(parts)[:n])
    return X, f"15-Scene dense RootSIFT ({used} images, DenseSIFT(root=True) defaults)"


def _interleaved_medians(functions, repeats):
    for function in functions.values():
        function()  # warm-up: JIT compilation, caches, thread pools
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def netvlad_speed(n=10_000, ks=(64, 256), threads=2, repeats=15, descriptors=None, seed=0):
    """Median encoding times of one image of ``n`` descriptors.

    Returns
    -------
    list of dict
        One per K: ``k``, ``n``, ``dim``, ``alpha``, ``netvlad_v2_ms``, ``netvlad_v1_ms``,
        ``soft_vlad_ms``, ``ratio_v2``, ``ratio_v1`` (NetVLAD time / soft VLAD time), and
        ``max_abs_difference`` between the v2 NetVLAD and soft VLAD vectors without intra
        normalisation (the same mathematics: should be ~1e-7).
    """
    if descriptors is None:
        descriptors, _ = rootsift_descriptors(n)
    X = np.ascontiguousarray(descriptors[:n], dtype=np.float32)
    sets = [X]
    rows = []
    for k in ks:
        vocabulary = KMeansVocabulary(k, random_state=seed, n_init=1, max_iter=50).fit(sets)
        v2 = init_netvlad(vocabulary, X, "v2")
        v1 = init_netvlad(vocabulary, X, "v1")
        alpha = v2.metadata["alpha"]
        encoders = {
            "netvlad_v2": NetVLADEncoder(v2, n_jobs=threads).fit(sets),
            "netvlad_v1": NetVLADEncoder(v1, n_jobs=threads).fit(sets),
            "soft_vlad": VLADEncoder(vocabulary=vocabulary, assignment="soft", alpha=alpha, power=None,
                                     n_jobs=threads).fit(sets),
        }
        with limit_threads(threads):
            medians = _interleaved_medians({name: (lambda e=e: e.transform(sets)) for name, e in encoders.items()},
                                           repeats)
        # the same mathematics (intra normalisation's epsilons aside, see the tests)
        plain = dict(intra_norm=False)
        a = NetVLADEncoder(init_netvlad(vocabulary, X, "v2", **plain)).fit(sets).transform(sets)
        b = VLADEncoder(vocabulary=vocabulary, assignment="soft", alpha=alpha, power=None,
                        **plain).fit(sets).transform(sets)
        rows.append({
            "k": k, "n": len(X), "dim": X.shape[1], "alpha": alpha,
            **{f"{name}_ms": 1000 * value for name, value in medians.items()},
            "ratio_v2": medians["netvlad_v2"] / medians["soft_vlad"],
            "ratio_v1": medians["netvlad_v1"] / medians["soft_vlad"],
            "max_abs_difference": float(np.abs(a - b).max()),
        })
    return rows


def format_table(rows):
    lines = ["| K | NetVLAD v2 (bias) ms | NetVLAD v1 (no bias) ms | soft VLAD ms | v2 / soft | v1 / soft |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['k']} | {row['netvlad_v2_ms']:.1f} | {row['netvlad_v1_ms']:.1f} | "
                     f"{row['soft_vlad_ms']:.1f} | {row['ratio_v2']:.2f}x | {row['ratio_v1']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="descriptors in the image (default 10,000)")
    parser.add_argument("-k", type=int, nargs="+", default=[64, 256], help="vocabulary sizes (default 64 256)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS / numba threads (default 2)")
    parser.add_argument("--repeats", type=int, default=15, help="runs per encoder, median taken (default 15)")
    args = parser.parse_args(argv)
    X, source = rootsift_descriptors(args.n)
    print(f"N = {len(X):,} descriptors of dimension {X.shape[1]} ({source}), {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    rows = netvlad_speed(len(X), args.k, args.threads, args.repeats, descriptors=X)
    print(format_table(rows))
    for row in rows:
        verdict = "within" if row["ratio_v2"] <= 1.5 else "NOT within"
        print(f"K = {row['k']}: NetVLAD is {row['ratio_v2']:.2f}x soft VLAD's time ({verdict} the 1.5x target); "
              f"v2 vectors vs soft VLAD (no intra norm): max |difference| {row['max_abs_difference']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
