"""`vladkit serve` on 15-Scene: query latency and throughput, against one `vladkit search`;
or (``--idle-attack``) latency with and without 1,000 idle connections held open.

    python benchmarks/bench_serve.py [--data ../shared/data/scene15] [--cache bench-serve-cache]
        [--index FOLDER] [--subset N] [--warm 50] [--clients 8] [--queries 200] [--rerank R]
        [--repeat 5] [--out FILE]
    python benchmarks/bench_serve.py --idle-attack [--subset 300] [--idle 1000] [--reopen 1]
        [--clients 8] [--queries 30] [--rounds 4] [--unguarded] [--out FILE]

**The index** (built once into ``--cache`` and reused; or ``--index FOLDER``, any index from
``vladkit index build``): Fisher vectors K=64 (GMM on PCA-64 sparse RootSIFT) of the 1,498
``train/`` photos, PCA-256-whitened and product-quantized to 64 bytes per image, every
step a ``python -m vladkit`` command::

    vladkit vocab build train --features sift --root -k 64 --kind gmm -o gmm.npz
    vladkit encode train --vocab gmm.npz -o train.npz
    vladkit index build train.npz --pca 256 --pq 64x8 -o train.index   # + --rerank-features with --rerank

**The server** runs as deployed, in its own process: ``python -m vladkit serve INDEX
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
* **(c) the command line**: the wall time of ``python -m vladkit search INDEX
  IMAGE.jpg`` (median of ``--repeat`` (5) runs): starting Python, importing vladkit, loading
  the index, then one query; the ratio (c) / (a) is what the server saves per query.

``--subset N`` indexes N ``train/`` photos instead (the same number from each class,
copied into ``--cache``), for a quicker build.

**--idle-attack** (issue 29: 256 connections that sent nothing had every other client
answered 503): ``--clients`` (8) threads on 127.0.0.1, each sending ``--queries`` (30)
pairs of ``GET /api/search?id=ID&top=10`` (an indexed photo, extracted again) and
``GET /api/health`` over a kept-alive connection, in these scenarios side by side:

* no attack;
* ``--idle`` (1,000) connections from one other client (127.0.0.2: Linux routes all of
  127.0.0.0/8 to the loopback interface), in a process of its own, that never send a
  byte, opened at once and held; the clients start once the server has dealt with that
  burst (nothing closed for 0.5 s);
* the same, the attacker opening again every ``--reopen`` (1) seconds those the server
  closed, so that it holds 1,000 at each of those moments (0: no such scenario): a
  flood of ~1,000 new connections a second.

The scenarios alternate for ``--rounds`` (4) rounds, so that a change in the machine's
load falls on each. Printed: each scenario's median and p99 latency per endpoint; the
ratios p99(attack) / p99(no attack), which should stay within 2x for the held
connections (exit status 1 otherwise; a flood of new connections costs asyncio's accept
itself, ~0.2-0.4 ms each here, and is for a firewall's per-address rate limit); what the
server did with the idle sockets (answered 503 and closed at once beyond the per-client
cap, closed at the header timeout). ``--unguarded`` adds the held attack on a server
with the guards off (``--max-connections-per-client 0 --header-timeout 86400``):
uvicorn's own behaviour, where the answers are 503s. The soft limit on open files is
raised for the 1,000 sockets (the server, a child, inherits it).

The load average before and after is printed: on a shared machine the figures are slower
and noisier than on a quiet one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"


def _vladkit(*args, cwd=None):
    command = [sys.executable, "-m", "vladkit", *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_serve: {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def subset_folder(data, cache, n):
    """``n`` train/ photos, the same number from each class (the first by name), copied
    into ``cache/train-N/CLASS/``: the indexed files (their ids are these paths)."""
    classes = sorted(d for d in (data / "train").iterdir() if d.is_dir())
    folder = cache / f"train-{n}"
    if not folder.is_dir():
        scratch = cache / f".train-{n}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        for k, source in enumerate(classes):
            (scratch / source.name).mkdir(parents=True)
            for photo in sorted(source.glob("*.jpg"))[:n // len(classes) + (k < n % len(classes))]:
                shutil.copyfile(photo, scratch / source.name / photo.name)
        scratch.rename(folder)  # complete, or absent
    return folder.resolve()


def build_index(data, cache, rerank, subset=None):
    """The 64-byte Fisher-vector index of train/ (or of ``subset`` of its photos), built
    once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    train = (data / "train").resolve() if subset is None else subset_folder(data, cache, subset)
    tag = "train" if subset is None else f"train-{subset}"
    index = cache / (f"{tag}-rerank.index" if rerank else f"{tag}.index")
    # (the full set's files keep their earlier names, so that existing caches are reused)
    gmm = cache / ("gmm.npz" if subset is None else f"gmm-{tag}.npz")
    encodings = cache / f"{tag}.npz"
    steps = [
        (gmm, ["vocab", "build", train, "--features", "sift", "--root", "-k", 64, "--kind", "gmm",
               "--seed", 0, "-q", "-o", gmm]),
        (encodings, ["encode", train, "--vocab", gmm, "-q", "-o", encodings]),
        (index / "metadata.json", ["index", "build", encodings, "--pca", 256, "--pq", "64x8", "-q",
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
        self.command = [sys.executable, "-m", "vladkit", "serve", str(index), "--port", str(self.port), "-q",
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


# ------------------------------------------------------------------- --idle-attack

#: The attacker's address: another client than the measured ones (127.0.0.1).
ATTACKER = "127.0.0.2"


def raise_open_files(needed):
    """Raise this process's soft limit on open files to at least ``needed`` (children,
    the server among them, inherit it); exit if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(f"bench_serve: {needed} open files are needed, the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


class IdleAttacker(multiprocessing.Process):
    """``count`` connections to the server from ``source`` that never send a byte.

    Every ``reopen`` seconds the ones the server closed are opened again, so that the
    attacker holds ``count`` at each of those moments (0: opened once, then only held).
    Counts what the server did: answered (503) and closed, or closed without a word. A
    process of its own: in the measuring process, its work would hold the GIL against the
    measured clients' threads and inflate their times.
    """

    def __init__(self, port, count, source=ATTACKER, reopen=1.0):
        super().__init__(daemon=True, name="idle-attacker")
        self.port, self.count, self.source, self.reopen = port, count, source, reopen
        self.ready, self.stopped = multiprocessing.Event(), multiprocessing.Event()
        self._counts = multiprocessing.Array("q", 5)  # opened, answered, silent, failed, open at the end
        self.opened = self.answered = self.silent = self.failed = self.open_at_end = 0

    def _connect(self, selector):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.source, 0))
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            self.failed += 1
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, b"")
        self.opened += 1

    def run(self):
        try:
            self._attack()
        finally:
            self._counts[:] = [self.opened, self.answered, self.silent, self.failed, self.open_at_end]

    def _attack(self):
        raise_open_files(self.count + 1024)
        with selectors.DefaultSelector() as selector:
            for _ in range(self.count):
                self._connect(selector)
            # Ready once the server has dealt with the opening burst (nothing closed for
            # 0.5 s, or 5 s passed): the measurement is of the connections held, not of
            # the one burst (reopening makes bursts again, within it).
            opened, last_close = time.monotonic(), time.monotonic()
            next_reopen = float("inf")
            while not self.stopped.is_set():
                now = time.monotonic()
                if not self.ready.is_set() and (now - last_close > 0.5 or now - opened > 5):
                    self.ready.set()
                    next_reopen = now + (self.reopen or float("inf"))
                for key, _ in selector.select(timeout=0.05):
                    try:
                        chunk = key.fileobj.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if chunk:  # the server's answer before its close
                        selector.modify(key.fileobj, selectors.EVENT_READ, key.data + chunk)
                        continue
                    if key.data.startswith(b"HTTP/1.1 503"):
                        self.answered += 1
                    else:
                        self.silent += 1
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    last_close = time.monotonic()
                if time.monotonic() >= next_reopen:
                    for _ in range(self.count - len(selector.get_map())):
                        self._connect(selector)
                    next_reopen = time.monotonic() + self.reopen
            self.open_at_end = len(selector.get_map())
            for key in list(selector.get_map().values()):
                key.fileobj.close()

    def stop(self):
        self.stopped.set()
        self.join(60)
        self.opened, self.answered, self.silent, self.failed, self.open_at_end = self._counts[:]


def measured_load(port, clients, queries, ids):
    """``clients`` threads, each sending ``queries`` pairs (a search by id, then a health
    request) on its own kept-alive connection: {"search": seconds, "health": seconds,
    "errors": messages}."""
    results = {"search": [], "health": [], "errors": []}
    lock = threading.Lock()

    def client(k):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = {"search": [], "health": []}
        try:
            for j in range(queries):
                image_id = ids[(k * queries + j) * 7919 % len(ids)]  # spread over the index
                for kind, path in (("search", f"/api/search?top=10&id={quote(image_id, safe='')}"),
                                   ("health", "/api/health")):
                    started = time.perf_counter()
                    connection.request("GET", path)
                    response = connection.getresponse()
                    body = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{path[:40]}: HTTP {response.status} {body[:100]!r}")
                    mine[kind].append(time.perf_counter() - started)
        except Exception as error:  # reported with the scenario; the rest of its queries are lost
            with lock:
                results["errors"].append(f"client {k}: {error}")
        finally:
            connection.close()
        with lock:
            for kind in mine:
                results[kind].extend(mine[kind])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def idle_attack(args):
    """--idle-attack: the measured clients' latency without and with the idle connections."""
    with socket.socket() as probe:
        try:
            probe.bind((ATTACKER, 0))
        except OSError as error:
            sys.exit(f"bench_serve: cannot bind a socket to {ATTACKER} ({error.strerror}): --idle-attack needs "
                     "the whole of 127.0.0.0/8 on the loopback interface, as on Linux")
    raise_open_files(args.idle + 1024)
    ids = json.loads((args.index / "ids.json").read_text(encoding="utf-8"))
    load_before = os.getloadavg()
    # {name: reopen}: None, no attack; 0, opened once and held; S, the closed ones opened
    # again every S seconds.
    plan = {"no attack": None, f"{args.idle:,} idle, held": 0.0}
    if args.reopen:
        plan[f"{args.idle:,} idle, reopened every {args.reopen:g} s"] = args.reopen
    scenarios = {name: [] for name in plan}
    attackers = {name: [] for name in plan}

    def run_scenario(server, name, reopen):
        attacker = None
        if reopen is not None:
            attacker = IdleAttacker(server.port, args.idle, reopen=reopen)
            attacker.start()
            if not attacker.ready.wait(120):
                sys.exit("bench_serve: the attacker could not open its connections within 120 s")
        started = time.perf_counter()
        result = measured_load(server.port, args.clients, args.queries, ids)
        result["wall"] = time.perf_counter() - started
        if attacker is not None:
            attacker.stop()
            attackers[name].append(attacker)
        time.sleep(1)  # the closes settle before the next scenario
        return result

    with Server(args.index) as server:
        print(f"server: {len(ids):,} images, started in {server.startup:.1f} s; {args.clients} clients x "
              f"{args.queries} x (search by id + health) per scenario, {args.rounds} rounds")
        measured_load(server.port, args.clients, 3, ids)  # warm-up, not counted: first calls, page cache
        for round_ in range(args.rounds):
            for name, reopen in plan.items():
                scenarios[name].append(run_scenario(server, name, reopen))
                print(f"  round {round_ + 1}: {name}: {scenarios[name][-1]['wall']:.1f} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    if args.unguarded:
        name = f"{args.idle:,} idle, held; guards off"
        attackers[name] = []
        with Server(args.index, ["--max-connections-per-client", "0", "--header-timeout", "86400"]) as server:
            measured_load(server.port, args.clients, 3, ids)
            scenarios[name] = [run_scenario(server, name, 0.0)]

    def merged(name, kind):
        return [x for result in scenarios[name] for x in result[kind]]

    def cell(values):
        if not values:
            return "-"
        return f"{1000 * statistics.median(values):.1f} / {1000 * percentile(values, 99):.1f}"

    lines = [
        f"`vladkit serve` (default limits), {args.clients} clients on 127.0.0.1, each {args.queries} x "
        f"{args.rounds} pairs of GET /api/search?id= (top 10) and GET /api/health on a kept-alive connection; "
        f"attack: {args.idle:,} connections from another client ({ATTACKER}) that never send a byte. "
        f"Index: {len(ids):,} 15-Scene train/ photos, Fisher vectors K=64, PCA-256 + PQ 64x8.",
        "",
        "| scenario | search p50 / p99 (ms) | health p50 / p99 (ms) | answered 200 | clients failed | "
        "idle sockets: opened / 503 at once / closed at the header timeout |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in scenarios:
        errors = [e for result in scenarios[name] for e in result["errors"]]
        answered = len(merged(name, "search")) + len(merged(name, "health"))
        mine = attackers[name]
        idle = (f"{sum(a.opened for a in mine):,} / {sum(a.answered for a in mine):,} / "
                f"{sum(a.silent for a in mine):,}") if mine else "-"
        lines.append(f"| {name} | {cell(merged(name, 'search'))} | {cell(merged(name, 'health'))} | {answered:,} | "
                     f"{len(errors)}{' (' + errors[0] + ')' if errors else ''} | {idle} |")
    lines.append("")
    verdicts = []
    for name, reopen in plan.items():
        if reopen is None:
            continue
        for kind in ("search", "health"):
            ratio = percentile(merged(name, kind), 99) / percentile(merged("no attack", kind), 99)
            lines.append(f"p99({kind}, {name}) / p99({kind}, no attack) = {ratio:.2f} "
                         f"({'within' if ratio <= 2 else 'NOT within'} 2x)")
            if not reopen:  # the criterion: connections held; a flood is for a firewall (README)
                verdicts.append(ratio <= 2 and not any(result["errors"] for result in scenarios[name]))
    lines += [
        "",
        f"{os.cpu_count()} cores (clients, attacker and server on the same ones); load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
    ]
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")
    return 0 if all(verdicts) and not any(result["errors"] for result in scenarios["no attack"]) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="15-Scene (train/ and test/)")
    parser.add_argument("--cache", type=Path, default=Path("bench-serve-cache"),
                        help="folder where the index is built once (default ./bench-serve-cache)")
    parser.add_argument("--index", type=Path, default=None, help="serve this index instead of building one")
    parser.add_argument("--warm", type=int, default=50, help="queries of the single-client latency (default 50)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the load test (default 8)")
    parser.add_argument("--queries", type=int, default=None,
                        help="queries per client (default 200; with --idle-attack, 30 pairs a round)")
    parser.add_argument("--rerank", type=int, default=0, metavar="R",
                        help="re-rank each query's top R (builds the index with --rerank-features)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the one-query command (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="index N train/ photos (as many from each class) instead of all 1,498")
    attack = parser.add_argument_group("--idle-attack")
    attack.add_argument("--idle-attack", action="store_true",
                        help="measure latency without and with idle connections held open (only that)")
    attack.add_argument("--idle", type=int, default=1000, help="idle connections of the attacker (default 1000)")
    attack.add_argument("--reopen", type=float, default=1.0, metavar="S",
                        help="the attacker opens again the closed ones every S seconds (default 1; 0: never)")
    attack.add_argument("--rounds", type=int, default=4, help="rounds of the scenarios (default 4)")
    attack.add_argument("--unguarded", action="store_true",
                        help="also attack a server with the guards off (uvicorn alone)")
    args = parser.parse_args(argv)
    if args.queries is None:
        args.queries = 30 if args.idle_attack else 200

    tests = sorted((args.data / "test").glob("*/*.jpg"))
    if len(tests) < args.warm + 5 or not (args.data / "train").is_dir():
        sys.exit(f"bench_serve: 15-Scene not found at {args.data} (train/ and test/)")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if args.index is None:
        print(f"index (cached in {args.cache}):")
        args.index = build_index(args.data, args.cache, args.rerank, args.subset)
    info_path = args.index / "metadata.json"
    if not info_path.is_file():
        sys.exit(f"bench_serve: {args.index} is not an index folder")
    if args.idle_attack:
        return idle_attack(args)
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
