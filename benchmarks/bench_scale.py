"""Scale-out: encoding on Dask against one process, memory against collection size, and an
IVF-PQ index built out of core. Each measurement runs in its own process.

    python benchmarks/bench_scale.py [--cache DIR] [--only same-bytes,throughput,memory,index]
        [--memory-images 2000 20000] [--index-vectors 1000000]

* same-bytes: 15-Scene ``train/`` (1,500 photos), VLAD K=64 on dense RootSIFT, encoded by
  ``vladkit encode`` in one process, with ``--workers 2``, and by the Python API
  (``encode_images(client=...)`` on a LocalCluster of 2 processes): the output folders
  must be byte-identical.
* throughput: images per second of ``--workers 1`` and ``--workers 2`` on the same images
  (the two runs of same-bytes' --workers 2 and one more of --workers 1), and the client's
  CPU time (it must not be the bottleneck).
* memory: peak resident memory of the client and of each worker (``ru_maxrss``) encoding
  N synthetic 200x160 images (textured, PNG; the collection's size is what varies
  here, the images' size is bench_photos.py's) on a LocalCluster of 2 workers, for N = 2,000
  and 20,000 (the issue: the second within 1.2x of the first), and the same on one
  process.
* index: 1,000,000 synthetic 256-D unit vectors (64 Gaussian clusters) written as shards,
  then ``vladkit index build --pq 64x8 --nlist 1024`` (64 bytes per vector): its peak
  resident memory (the issue: under 1.5 GB) and a search.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import vladkit  # noqa: F401  (first: it sets the BLAS / OpenMP thread waits before numpy loads)

import numpy as np

SCENE15 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "scene15"
PYTHON = sys.executable


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_bytes(folder):
    return {name: (Path(folder) / name).read_bytes() for name in sorted(os.listdir(folder))}


def run(command, **options):
    """Run a command; (seconds, completed process)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **options)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, command))}\n{done.stderr[-2000:]}")
    return seconds, done


def vladkit_cli(*args):
    return [PYTHON, "-m", "vladkit", *map(str, args)]


def time_cli(*args):
    """CLI run under /usr/bin/time-like accounting: (wall s, child CPU s, peak RSS MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, done = run(vladkit_cli(*args))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), done


# ------------------------------------------------------------------------------ children


def child_api(folder, output, vocabulary, workers):
    """Encode ``folder`` with the Python API on a LocalCluster; print JSON with the peak RSS
    of the client and of each worker."""
    from distributed import Client, LocalCluster

    from vladkit import DenseSIFT, Recipe, encode_images, list_images

    paths = list_images(folder, recursive=True)
    recipe = Recipe.make(DenseSIFT(root=True), vocabulary, "vlad")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        start = time.perf_counter()
        encode_images(paths, recipe, output, client=client, on_skipped=lambda path, reason: None)
        seconds = time.perf_counter() - start
        workers_peak = client.run(peak_rss_mb)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "client_mb": peak_rss_mb(), "workers_mb": sorted(workers_peak.values()),
                      "n": len(paths), "client_cpu": usage.ru_utime + usage.ru_stime}))


def child_local(folder, output, vocabulary):
    from vladkit import DenseSIFT, Recipe, encode_images, list_images

    paths = list_images(folder, recursive=True)
    recipe = Recipe.make(DenseSIFT(root=True), vocabulary, "vlad")
    start = time.perf_counter()
    encode_images(paths, recipe, output, n_jobs=2, on_skipped=lambda path, reason: None)
    print(json.dumps({"seconds": time.perf_counter() - start, "client_mb": peak_rss_mb(), "n": len(paths)}))


def child_write_vectors(folder, n, dim, vocabulary):
    """n synthetic unit vectors (64 clusters) as a sharded encodings folder, shard by shard."""
    from vladkit import DenseSIFT, Recipe
    from vladkit.pipeline.sharded import write_images, write_manifest, write_shard

    shard = 100_000
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"synthetic/{i:07d}" for i in range(n)]
    job = {"recipe": Recipe.make(DenseSIFT(root=True), vocabulary, "vlad").to_json(), "n_images": n,
           "synthetic": True}
    write_images(folder, ids)
    reports = []
    for number, first in enumerate(range(0, n, shard)):
        end = min(first + shard, n)
        x = centres[rng.integers(0, 64, end - first)] + 0.6 * rng.standard_normal((end - first, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        reports.append(write_shard(folder, number, first, end, x, ids[first:end], []))
    write_manifest(folder, job, reports, dim=dim)


def child_index(encodings, output):
    """Build the IVF-PQ index out of core in this process (the CLI's code path); print its
    peak RSS and a search's first result."""
    from vladkit import VectorIndex, load_encodings
    from vladkit.app.cli import main

    code = main(["index", "build", str(encodings), "--pq", "64x8", "--nlist", "1024", "-o", str(output)])
    assert code == 0
    peak = peak_rss_mb()
    index = VectorIndex.load(output)
    queries = load_encodings(encodings).take([0, 123_456, 999_999])
    _, ids = index.search(queries, k=3)
    print(json.dumps({"peak_mb": peak, "n": len(index), "bytes_per_vector": index.bytes_per_vector,
                      "first_results": [list(row) for row in ids]}))


# ------------------------------------------------------------------------------ parts


def vocabulary(cache):
    path = cache / "scene15-kmeans64.npz"
    if not path.exists():
        run(vladkit_cli("vocab", "build", SCENE15 / "train", "-k", 64, "--root", "--max-descriptors", 100_000,
                        "-o", path, "-q"))
    return path


def same_bytes_and_throughput(cache, args):
    images = SCENE15 / "train"
    words = vocabulary(cache)
    out = cache / "scale"
    out.mkdir(exist_ok=True)
    rows = []
    timings = {}
    for name, extra in [("one process (2 threads)", ["--jobs", 2]), ("--workers 1", ["--workers", 1]),
                        ("--workers 2", ["--workers", 2])]:
        target = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("-", "")
        if target.exists():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        seconds, cpu, _ = time_cli("encode", images, "--vocab", words, "--encoder", "vlad", "-o", target, "-q",
                                   *extra)
        timings[name] = (seconds, cpu, target)
    api_target = out / "api_workers_2"
    if api_target.exists():
        subprocess.run(["rm", "-rf", str(api_target)], check=True)
    _, done = run([PYTHON, __file__, "--child", "api", str(images), str(api_target), str(words), "2"])
    api = json.loads(done.stdout.strip().splitlines()[-1])
    reference = folder_bytes(timings["one process (2 threads)"][2])
    n = json.loads((timings["one process (2 threads)"][2] / "manifest.json").read_text())["n_vectors"]
    print(f"\n## Same bytes and throughput: 15-Scene train/, {n:,} images, VLAD K=64, dense RootSIFT\n")
    print("| run | wall s | images / s | CPU s* | output identical to one process |")
    print("|---|---|---|---|---|")
    for name, (seconds, cpu, target) in timings.items():
        same = folder_bytes(target) == reference
        print(f"| `vladkit encode` {name} | {seconds:.1f} | {n / seconds:.1f} | {cpu:.1f} | {'yes' if same else 'NO'} |")
    same = folder_bytes(api_target) == reference
    print(f"| Python API, LocalCluster of 2 (encode_images only) | {api['seconds']:.1f} | {n / api['seconds']:.1f} | "
          f"{api['client_cpu']:.1f} (client + scheduler) | {'yes' if same else 'NO'} |")
    one, two = timings["--workers 1"][0], timings["--workers 2"][0]
    print(f"\n2 workers / 1 worker: {one / two:.2f}x the images per second (wall, including the cluster's start)")
    print("* CPU seconds of the whole process tree (client, scheduler, nannies, workers), except where said")
    rows.append(("throughput ratio", one / two))
    return rows


def synthetic_photos(folder, n):
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (40, 50), dtype=np.uint8), (200, 160), interpolation=cv2.INTER_CUBIC)
    for i in range(have, n):
        image = np.roll(base, (i * 7) % 160, axis=0)
        image = np.roll(image, (i * 13) % 200, axis=1)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"{i:06d}.png"), image)


def memory(cache, args):
    words = vocabulary(cache)
    print("\n## Memory against collection size: synthetic 200x160 PNG images, VLAD K=64, dense RootSIFT\n")
    print("| images | run | wall s | client peak MB | worker peaks MB |")
    print("|---|---|---|---|---|")
    results = {}
    for n in args.memory_images:
        folder = cache / f"photos-{n}"
        if not folder.exists() or len(list(folder.rglob("*.png"))) < n:
            synthetic_photos(folder, n)
        for mode in ("api", "local"):
            target = cache / f"memory-{n}-{mode}"
            subprocess.run(["rm", "-rf", str(target)], check=True)
            child = [PYTHON, __file__, "--child", mode, str(folder), str(target), str(words)]
            _, done = run(child + (["2"] if mode == "api" else []))
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[(n, mode)] = result
            workers = ", ".join(f"{w:.0f}" for w in result.get("workers_mb", [])) or "-"
            name = "LocalCluster of 2" if mode == "api" else "one process"
            print(f"| {n:,} | {name} | {result['seconds']:.1f} | {result['client_mb']:.0f} | {workers} |", flush=True)
            subprocess.run(["rm", "-rf", str(target)], check=True)
    small, large = min(args.memory_images), max(args.memory_images)
    for mode in ("api", "local"):
        a, b = results[(small, mode)], results[(large, mode)]
        peak_a = max([a["client_mb"]] + a.get("workers_mb", []))
        peak_b = max([b["client_mb"]] + b.get("workers_mb", []))
        print(f"\n{mode}: largest peak at {large:,} images / at {small:,}: {peak_b / peak_a:.2f}x "
              f"(client {b['client_mb'] / a['client_mb']:.2f}x)")


def index(cache, args):
    words = vocabulary(cache)
    folder = cache / f"vectors-{args.index_vectors}"
    if not (folder / "manifest.json").exists():
        run([PYTHON, __file__, "--child", "write", str(folder), str(args.index_vectors), "256", str(words)])
    target = cache / "ivfpq.index"
    subprocess.run(["rm", "-rf", str(target)], check=True)
    seconds, done = run([PYTHON, __file__, "--child", "index", str(folder), str(target)])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in folder.glob("shard-*.npy")) / 1e9
    print(f"\n## Index out of core: {result['n']:,} x 256 vectors in shards ({size:.2f} GB of float32)\n")
    print(f"`vladkit index build --pq 64x8 --nlist 1024`: {seconds:.0f} s, peak resident memory "
          f"{result['peak_mb']:.0f} MB, {result['bytes_per_vector']} bytes per vector; "
          f"search of rows 0, 123456, 999999 -> first results {[r[0] for r in result['first_results']]}")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "api":
            child_api(rest[0], rest[1], rest[2], int(rest[3]))
        elif kind == "local":
            child_local(*rest)
        elif kind == "write":
            child_write_vectors(rest[0], int(rest[1]), int(rest[2]), rest[3])
        elif kind == "index":
            child_index(*rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("bench-scale-cache"))
    parser.add_argument("--only", default="same-bytes,memory,index")
    parser.add_argument("--memory-images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--index-vectors", type=int, default=1_000_000)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    print(f"vladkit {vladkit.__version__}, {os.cpu_count()} cores")
    if "same-bytes" in parts or "throughput" in parts:
        same_bytes_and_throughput(args.cache, args)
    if "memory" in parts:
        memory(args.cache, args)
    if "index" in parts:
        index(args.cache, args)


if __name__ == "__main__":
    main()
