"""faiss's bundled OpenBLAS kernel: faiss's own CPU detection against vladkit's choice.

    python benchmarks/bench_faiss_blas.py [--repeats 5] [--threads N] [--n 100000] [--nq 2000]
                                          [--dim 128] [--tasks flat kmeans ivfpq]

faiss-cpu's wheel bundles OpenBLAS 0.3.15, which runs its generic "Prescott" kernel on
CPU models newer than its table; ``import vladkit`` loads faiss with the kernel the CPU
supports (vladkit/_util/blas.py, issue 14). Every run is a fresh subprocess, without
OPENBLAS_CORETYPE in its environment, in one of two configurations:

* before: ``import faiss`` first (faiss's own detection);
* after: ``import vladkit`` first, then faiss.

Both get the thread-wait settings vladkit makes (OMP_WAIT_POLICY=PASSIVE,
OPENBLAS_THREAD_TIMEOUT=4) unless set already, so that only the kernel differs.

Tasks, timed inside the subprocess (data made there, seed 0, not timed):

* flat: exact inner-product search (``IndexFlatIP``) of --nq unit queries in --n unit
  vectors of --dim dimensions, 10 neighbours;
* kmeans: ``faiss.Kmeans(dim, 256, niter=20, seed=1)`` on the --n vectors (faiss samples
  256 points per centroid, 65,536);
* ivfpq: what vladkit trains with faiss k-means, ``VectorIndex("ivfpq", pq="16x8")``
  trained on 20,000 unit vectors (566 lists, spherical k-means, and 16 PQ codebooks).

Runs alternate before/after so that both see the same machine load; each row is the
median of --repeats runs. The results of the two configurations are compared too:
neighbour lists (the share identical, and whether every difference is an exchange of
near-equal scores), largest relative score difference, largest centroid difference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = ("before", "after")
TASKS = ("flat", "kmeans", "ivfpq")


def unit_vectors(n, dim, seed):
    X = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def worker(config, task, n, nq, dim, out):
    if config == "after":
        importlib.import_module("vladkit")  # loads faiss with the kernel it chooses
    import faiss
    from threadpoolctl import threadpool_info

    arch = [i.get("architecture") for i in threadpool_info() if "faiss" in i["filepath"]
            and i["internal_api"] == "openblas"]
    result = {}
    if task == "flat":
        xb, xq = unit_vectors(n, dim, 0), unit_vectors(nq, dim, 1)
        index = faiss.IndexFlatIP(dim)
        index.add(xb)
        start = time.perf_counter()
        D, I = index.search(xq, 10)
        seconds = time.perf_counter() - start
        result = {"D": D, "I": I}
    elif task == "kmeans":
        X = unit_vectors(n, dim, 0)
        kmeans = faiss.Kmeans(dim, 256, niter=20, seed=1)
        start = time.perf_counter()
        kmeans.train(X)
        seconds = time.perf_counter() - start
        result = {"centroids": kmeans.centroids}
    else:
        from vladkit import VectorIndex

        X = unit_vectors(20_000, dim, 0)
        index = VectorIndex("ivfpq", pq="16x8")
        start = time.perf_counter()
        index.train(X)
        seconds = time.perf_counter() - start
        index.add(X, [str(i) for i in range(len(X))])
        D, I = index.faiss_index.search(unit_vectors(nq, dim, 1), 10)
        result = {"D": D, "I": I}
    np.savez(out, **result)
    print(json.dumps({"seconds": seconds, "arch": arch}))


def run(config, task, args, out):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    # The thread-wait settings ``import vladkit`` makes (vladkit/__init__.py), for both
    # configurations alike: the kernel is then the only difference.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # faiss's and its OpenBLAS's (OpenMP) threads
    command = [sys.executable, __file__, "--worker", config, task, "--n", str(args.n),
               "--nq", str(args.nq), "--dim", str(args.dim), "--out", out]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(task, before, after, args):
    """How far the two configurations' results are apart, and each one from float64."""
    a, b = np.load(before), np.load(after)
    if task == "kmeans":
        X = unit_vectors(args.n, args.dim, 0).astype(np.float64)
        Xn = (X ** 2).sum(1)

        def inertia_and_labels(C):
            C = C.astype(np.float64)
            d = Xn[:, None] - 2 * X @ C.T + (C ** 2).sum(1)
            return d.min(1).sum(), d.argmin(1)

        (ia, la), (ib, lb) = inertia_and_labels(a["centroids"]), inertia_and_labels(b["centroids"])
        diff = np.abs(a["centroids"] - b["centroids"]).max()
        return (f"largest centroid difference {diff:.1e}; points assigned differently "
                f"{(la != lb).mean():.2%}; inertia (float64) before {ia:.2f}, after {ib:.2f} "
                f"(relative difference {(ib - ia) / ia:+.1e})")
    same = (a["I"] == b["I"]).all(axis=1).mean()
    scale = np.maximum(np.abs(a["D"]), np.abs(b["D"])).max()
    rel = np.abs(a["D"] - b["D"]).max() / scale
    text = f"identical neighbour lists {same:.1%}, largest score difference {rel:.1e} (relative)"
    if same < 1:
        # A differing list must differ only by exchanging near-equal scores.
        rows = np.flatnonzero(~(a["I"] == b["I"]).all(axis=1))
        gap = max(np.abs(np.sort(a["D"][r]) - np.sort(b["D"][r])).max() for r in rows)
        text += f"; differing rows' sorted scores within {gap / scale:.1e}"
    if task == "flat":
        # The scores against exact float64 inner products of the same pairs.
        xb = unit_vectors(args.n, args.dim, 0).astype(np.float64)
        xq = unit_vectors(args.nq, args.dim, 1).astype(np.float64)
        errors = []
        for r in (a, b):
            exact = np.einsum("qd,qkd->qk", xq, xb[r["I"]])
            errors.append(np.abs(r["D"] - exact).max())
        text += f"; largest error vs float64: before {errors[0]:.1e}, after {errors[1]:.1e}"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--nq", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of the runs (default: as set, else all cores)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "TASK"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.n, args.nq, args.dim, args.out)
        return

    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or f"all {os.cpu_count()} cores"
    print(f"flat: {args.nq:,} x {args.n:,} x {args.dim}; kmeans: k=256 on {args.n:,}; "
          f"ivfpq: 20,000 x {args.dim} training; threads: {threads}; "
          f"{args.repeats} runs each, medians\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            times = {c: [] for c in CONFIGS}
            arch = {}
            for r in range(args.repeats):
                for config in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                    out = os.path.join(tmp, f"{task}-{config}.npz")
                    res = run(config, task, args, out)
                    times[config].append(res["seconds"])
                    arch[config] = "/".join(res["arch"]) or "?"
            med = {c: statistics.median(times[c]) for c in CONFIGS}
            rows.append((task, arch, med, times))
            check = compare(task, *(os.path.join(tmp, f"{task}-{c}.npz") for c in CONFIGS), args)
            print(f"{task:7s} before ({arch['before']}) {med['before']:.3f} s   after "
                  f"({arch['after']}) {med['after']:.3f} s   ratio {med['before'] / med['after']:.2f}x")
            print(f"        runs before {' '.join(f'{t:.3f}' for t in times['before'])}; "
                  f"after {' '.join(f'{t:.3f}' for t in times['after'])}")
            print(f"        {check}")


if __name__ == "__main__":
    main()
