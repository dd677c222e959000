"""`vladkit serve` on 15-Scene: query latency and throughput, against one `vladkit search`.

    python benchmarks/bench_serve.py [--data ../shared/data/scene15] [--cache bench-serve-cache]
        [--index FOLDER] [--warm 50] [--clients 8] [--queries 200] [--rerank R] [--repeat 5]
        [--out FILE]

**The index** (built once into ``--cache`` and reused; or ``--index FOLDER``, any index from
``vladkit index build``): Fisher vectors K=64 (GMM on PCA-64 sparse RootSIFT) of the 1,498
``train/`` photos, PCA-256-whitened and product-quantized to 64 bytes per image, every
step a ``python -m vladkit.cli`` command::

    vladkit vocab build train --features sift --root -k 64 --kind gmm -o gmm.npz
    vladkit encode train --vocab gmm.npz -o train.npz
    vladkit index build train.npz --pca 256 --pq 64x8 -o train.index   # + --rerank-features with --rerank

**The server** runs as deployed, in its own process: ``python -m vladkit.cli serve INDEX
--port P -q`` (one worker thread per core, one thread per query), and the script waits for
its ``/api/health``. The queries are ``test/`` photos (200 x 200 JPEGs, never indexed),
uploaded as the request body over keep-alive HTTP connections on the loopback interface.

* **(a) warm latency**: one client, ``--warm`` (50) queries one after another, after 5
  that are not counted; the median (and p90) of the time the client waits for each answer
  (HTTP included), and the median of the server's own ``ms`` (decode, extract, encode,
  search).
* **(b) load**: ``--clients`` (8) threads, each sending ``--queries`` (200) queries, each
  client its own photos; any answer but 200 stops the script (exit status 1). Latency
  p50 / p90 / p99 over all queries, and throughput: queries / wall time of the run.
* **(c) the command line**: the wall time of ``python -m vladkit.cli search INDEX
  IMAGE.jpg`` (median of ``--repeat`` (5) runs): starting Python, importing vladkit, loading
  the index, then one query; the ratio (c) / (a) is what the server saves per query.

The load average before and after is printed: on a shared machine the figures are slower
and noisier than on a quiet one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"


def _vladkit(*args, cwd=None):
    command = [sys.executable, "-m", "vladkit.cli", *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_serve: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def build_index(data, cache, rerank):
    """The 64-byte Fisher-vector index of train/, built once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    train = (data / "train").resolve()
    index = cache / ("train-rerank.index" if rerank else "train.index")
    steps = [
        (cache / "gmm.npz", ["vocab", "build", train, "--features", "sift", "--root", "-k", 64, "--kind", "gmm",
                             "--seed", 0, "-q", "-o", cache / "gmm.npz"]),
        (cache / "train.npz", ["encode", train, "--vocab", cache / "gmm.npz", "-q", "-o", cache / "train.npz"]),
        (index / "metadata.json", ["index", "build", cache / "train.npz", "--pca", 256, "--pq", "64x8", "-q",
                                   "-o", index] + (["--rerank-features"] if rerank else [])),
    ]
    for output, args in steps:
        if output.exists():
            print(f"  cached: {output}")
            continue
        seconds, out = _vladkit(*args)
        print(f"  {seconds:6.1f} s  {out.strip()}")
    return index


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``vladkit serve INDEX`` in a subprocess, for the duration of a ``with`` block."""

    def __init__(self, index, extra=()):
        self.port = _free_port()
        self.command = [sys.executable, "-m", "vladkit.cli", "serve", str(index), "--port", str(self.port), "-q",
                        *extra]

    def __enter__(self):
        started = time.perf_counter()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/api/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.process.poll() is not None:
                sys.exit(f"bench_serve: the server stopped: {self.process.stderr.read()[-3000:]}")
            if time.perf_counter() - started > 180:
                self.process.kill()
                sys.exit("bench_serve: the server did not answer within 180 s")
            time.sleep(0.1)
        self.startup = time.perf_counter() - started
        return self

    def __exit__(self, *exc):
        self.process.send_signal(2)  # Ctrl-C: uvicorn's clean stop
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def query(connection, data, path):
    """One upload; (seconds, answer). Any status but 200 ends the benchmark."""
    started = time.perf_counter()
    connection.request("POST", path, body=data, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    body = response.read()
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body[:300]!r}")
    return seconds, json.loads(body)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="15-Scene (train/ and test/)")
    parser.add_argument("--cache", type=Path, default=Path("bench-serve-cache"),
                        help="folder where the index is built once (default ./bench-serve-cache)")
    parser.add_argument("--index", type=Path, default=None, help="serve this index instead of building one")
    parser.add_argument("--warm", type=int, default=50, help="queries of the single-client latency (default 50)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the load test (default 8)")
    parser.add_argument("--queries", type=int, default=200, help="queries per client (default 200)")
    parser.add_argument("--rerank", type=int, default=0, metavar="R",
                        help="re-rank each query's top R (builds the index with --rerank-features)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the one-query command (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    tests = sorted((args.data / "test").glob("*/*.jpg"))
    if len(tests) < args.warm + 5 or not (args.data / "train").is_dir():
        sys.exit(f"bench_serve: 15-Scene not found at {args.data} (train/ and test/)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if args.index is None:
        print(f"index (cached in {args.cache}):")
        args.index = build_index(args.data, args.cache, args.rerank)
    info_path = args.index / "metadata.json"
    if not info_path.is_file():
        sys.exit(f"bench_serve: {args.index} is not an index folder")
    path = "/api/search?top=10" + (f"&rerank={args.rerank}" if args.rerank else "")
    data = {p: p.read_bytes() for p in tests}

    with Server(args.index) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("GET", "/api/info")
        info = json.loads(connection.getresponse().read())
        print(f"server: {info['images']:,} images, {info['encoder']} K={info['words']}, {info['kind']} "
              f"{info['pq'] or ''} after PCA-{info['whitening']}, {info['bytes_per_image']} bytes per image; "
              f"started in {server.startup:.1f} s")
        # (a) one client, warm.
        for p in tests[:5]:
            query(connection, data[p], path)
        client_s, server_ms = [], []
        for p in tests[5:5 + args.warm]:
            seconds, answer = query(connection, data[p], path)
            client_s.append(seconds)
            server_ms.append(answer["ms"])
        connection.close()
        warm = statistics.median(client_s)

        # (b) load: clients x queries, each client its own photos.
        latencies, errors = [], []
        lock = threading.Lock()
        pool = tests[5 + args.warm:] or tests

        def client(k):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            mine = []
            try:
                for j in range(args.queries):
                    photo = pool[(k * args.queries + j) % len(pool)]
                    mine.append(query(connection, data[photo], path)[0])
            except Exception as error:  # any failure is reported, and fails the run
                with lock:
                    errors.append(f"client {k}: {error}")
            finally:
                connection.close()
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(f"bench_serve: {len(errors)} clients failed")

    # (c) the command line, one query per process.
    image = tests[5]
    command_s = [_vladkit("search", args.index, image, "--top", 10, *(["--rerank", args.rerank] if args.rerank else []),
                          )[0] for _ in range(args.repeat)]
    command = statistics.median(command_s)

    n = len(latencies)
    lines = [
        f"`vladkit serve` on 15-Scene: {info['images']:,} indexed train/ photos, queries from test/ (200 x 200 JPEG), "
        f"{info['bytes_per_image']} bytes per image" + (f", re-ranking the top {args.rerank}" if args.rerank else ""),
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| (a) warm query, one client: median / p90 (client-side, HTTP included) | "
        f"{1000 * warm:.1f} / {1000 * percentile(client_s, 90):.1f} ms |",
        f"| (a) the server's own time (decode, extract, encode, search{', re-rank' if args.rerank else ''}): median | "
        f"{statistics.median(server_ms):.1f} ms |",
        f"| (b) {args.clients} clients x {args.queries} queries: errors | 0 of {n} |",
        f"| (b) latency p50 / p90 / p99 | {1000 * percentile(latencies, 50):.1f} / "
        f"{1000 * percentile(latencies, 90):.1f} / {1000 * percentile(latencies, 99):.1f} ms |",
        f"| (b) throughput | {n / wall:.1f} queries/s ({wall:.1f} s wall) |",
        f"| (c) `vladkit search INDEX image.jpg`, one process: median of {args.repeat} | {command:.2f} s |",
        f"| (c) / (a): one command per query against one warm query | {command / warm:.0f}x |",
        "",
        f"{os.cpu_count()} cores; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"server start (imports, index, warm-up) {server.startup:.1f} s.",
    ]
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
