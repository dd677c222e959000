"""An ASMK* inverted file of a million synthetic images: built from shards under a memory
budget, then loaded memory-mapped and searched.

    python benchmarks/bench_asmk_scale.py --images 1000000 --words 65536 --per-image 300
        --max-memory 2G --workdir /tmp/asmk-scale [--queries 100] [--out benchmarks/results/asmk_scale.md]

Synthetic word sets with a real-like skew: word w's probability ~ 1 / (rank(w) + 10)^s
(Zipf-like, ``--zipf s``, ranks a random permutation of the words), each image ~``per-image``
distinct words (draws with repetition until that many are expected to be distinct) with
random 128-bit signatures; written as ``.npy`` shards of ``--shard-images`` images, sorted
by (word, image), the builder's input. Queries: word sets of a real-like query image with
multiple assignment 5 (~300 descriptors -> ~900 distinct words); half of them noisy copies
of an indexed image (80 % of its words, each signature with 10 % of its bits flipped, the
rest of the words drawn from the distribution with random signatures), so that recall
says the results are meaningful.

Steps, each in a fresh process (its resident memory its own):

1. the shards and queries (skipped when the work folder holds them);
2. ``build_asmk_index`` under ``--max-memory``: wall time and peak resident memory
   (VmHWM, the whole process: interpreter and libraries included);
3. ``ASMKIndex.load``: resident memory right after (VmRSS); warm queries (after one pass
   over the queries), one at a time, median and 90th percentile; recall of the copies;
4. a cold query: the index's files evicted from the page cache
   (``posix_fadvise(DONTNEED)``) before a fresh process loads the index and runs it.

Then bytes per image on disk and a linear projection to 10M images. The work folder is
removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SIGNATURE_BYTES = 16  # 128 bits
QUERY_WORDS = 900     # distinct words of a query (300 descriptors, multiple assignment 5)


class SyntheticIds(Sequence):
    """Ids made on demand: a million of them are never held as objects by the builder."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f"synthetic/{i // 1000:04d}/{i:07d}.jpg"


# -- data ------------------------------------------------------------------------------


def word_distribution(n_words, s, seed):
    """(cumulative probabilities by rank, rank -> word): Zipf-like with offset 10."""
    p = 1.0 / (np.arange(n_words) + 10.0) ** s
    p /= p.sum()
    return np.cumsum(p), np.random.default_rng(seed).permutation(n_words), p


def draws_for(p, distinct):
    """How many draws with repetition give ``distinct`` distinct words on average."""
    lo, hi = distinct, 20 * distinct
    while lo < hi:
        d = (lo + hi) // 2
        if np.sum(1 - (1 - p) ** d) < distinct:
            lo = d + 1
        else:
            hi = d
    return lo


def sample_words(rng, cdf, words_of_rank, n_rows, draws):
    """``n_rows`` rows of distinct words (sorted), as a list of arrays."""
    ranks = np.minimum(np.searchsorted(cdf, rng.random((n_rows, draws))), len(cdf) - 1)
    rows = np.sort(words_of_rank[ranks], axis=1)
    keep = np.ones(rows.shape, dtype=bool)
    keep[:, 1:] = rows[:, 1:] != rows[:, :-1]
    return [row[k] for row, k in zip(rows, keep)]


def write_shards(args, folder, cdf, words_of_rank, draws):
    from vladkit.pipeline.word_sets import entry_dtype
    dtype = entry_dtype(np.uint8, (SIGNATURE_BYTES,))
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, args.images, args.shard_images):
        rng = np.random.default_rng([args.seed, first])
        n = min(args.shard_images, args.images - first)
        rows = sample_words(rng, cdf, words_of_rank, n, draws)
        words = np.concatenate(rows)
        images = np.repeat(np.arange(n, dtype=np.int32), [len(r) for r in rows])
        order = np.argsort(words.astype(np.int64) * n + images)
        entries = np.empty(len(words), dtype=dtype)
        entries["word"], entries["image"] = words[order], images[order]
        entries["signature"] = rng.integers(0, 256, size=(len(words), SIGNATURE_BYTES), dtype=np.uint8)
        np.save(folder / f"shard-{first:09d}.npy", entries)
        if first // args.shard_images % 200 == 0:
            print(f"  shards: {first + n:,} / {args.images:,} images", file=sys.stderr, flush=True)


def shard_list(folder):
    return [(int(p.stem.split("-")[1]), str(p)) for p in sorted(folder.glob("shard-*.npy"))]


def image_words(shards, image):
    """(words, signatures) of an indexed image, read back from its shard."""
    firsts = [first for first, _ in shards]
    k = int(np.searchsorted(firsts, image, side="right")) - 1
    entries = np.load(shards[k][1], mmap_mode="r")
    mine = np.asarray(entries[entries["image"] == image - shards[k][0]])
    return mine["word"].astype(np.int64), mine["signature"].copy()


def make_queries(args, shards, cdf, words_of_rank):
    """Query word sets; ``truth[i]`` the copied image or -1."""
    rng = np.random.default_rng([args.seed, 10**9])
    extra = draws_for(np.diff(cdf, prepend=0.0), QUERY_WORDS)
    words_list, signature_list, truth = [], [], []
    for q in range(args.queries):
        words = sample_words(rng, cdf, words_of_rank, 1, extra)[0].astype(np.int64)
        signatures = rng.integers(0, 256, size=(len(words), SIGNATURE_BYTES), dtype=np.uint8)
        source = -1
        if q % 2 == 0:
            source = int(rng.integers(args.images))
            kept_words, kept = image_words(shards, source)
            keep = rng.random(len(kept_words)) < 0.8
            kept_words, kept = kept_words[keep], kept[keep]
            flips = np.packbits(rng.random((len(kept), 8 * SIGNATURE_BYTES)) < 0.1, axis=1)
            kept = kept ^ flips
            others = ~np.isin(words, kept_words)
            n_others = max(0, QUERY_WORDS - len(kept_words))
            words = np.concatenate([kept_words, words[others][:n_others]])
            signatures = np.concatenate([kept, signatures[others][:n_others]])
            order = np.argsort(words)
            words, signatures = words[order], signatures[order]
        words_list.append(words)
        signature_list.append(signatures)
        truth.append(source)
    offsets = np.cumsum([0] + [len(w) for w in words_list])
    return {"offsets": offsets, "words": np.concatenate(words_list), "signatures": np.concatenate(signature_list),
            "truth": np.array(truth)}


def load_queries(path):
    from vladkit.encoders.asmk import WordSignatures
    with np.load(path) as archive:
        offsets, words, signatures, truth = (archive[k] for k in ("offsets", "words", "signatures", "truth"))
    sets = [WordSignatures(words[a:b], signatures[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return sets, truth


# -- the steps, each run in a child process ---------------------------------------------


def status(field):
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def step_build(args):
    from vladkit.retrieval.asmk_build import ShardSource, build_asmk_index
    work = Path(args.workdir)
    source = ShardSource(shard_list(work / "shards"), SyntheticIds(args.images), args.words)
    last = [time.perf_counter()]

    def progress(stage, done, total):
        if stage == "write" or time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  build: {stage} {done}/{total}", file=sys.stderr, flush=True)

    before = status("VmRSS")  # the interpreter and libraries: the budget is the build's own memory
    start = time.perf_counter()
    stats = build_asmk_index(source, work / "index", max_memory=args.max_memory_bytes, progress=progress)
    stats.update(seconds=time.perf_counter() - start, peak_rss=status("VmHWM"), rss_before=before)
    return stats


def step_search(args):
    rss_start = status("VmRSS")
    from vladkit.retrieval.asmk_index import ASMKIndex
    work = Path(args.workdir)
    rss_imported = status("VmRSS")
    start = time.perf_counter()
    index = ASMKIndex.load(work / "index")
    load_seconds = time.perf_counter() - start
    rss_loaded = status("VmRSS")
    sets, truth = load_queries(work / "queries.npz")
    for query in sets:   # warm: page cache, numba's cache, the scratch
        index.search([query], k=100)
    times, cpu, ranks = [], [], []
    for query, source in zip(sets, truth):
        start, start_cpu = time.perf_counter(), time.process_time()
        _, ids = index.search([query], k=100)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if source >= 0:
            wanted = SyntheticIds(args.images)[source]
            ranks.append(ids[0].index(wanted) + 1 if wanted in ids[0] else 10**9)
    words = np.unique(np.concatenate([q.words for q in sets]))
    offsets = np.asarray(index._arrays["word_offsets"])
    words = words[words < len(offsets) - 1]
    visited = [int(offsets[w + 1] - offsets[w]) for q in sets for w in q.words if w < len(offsets) - 1]
    ranks = np.array(ranks)
    return {"rss_start": rss_start, "rss_imported": rss_imported, "rss_loaded": rss_loaded,
            "rss_after_queries": status("VmRSS"), "anon_after_queries": status("RssAnon"),
            "load_seconds": load_seconds, "median": float(np.median(times)), "p90": float(np.percentile(times, 90)),
            "cpu_median": float(np.median(cpu)), "threads": _threads(),
            "entries_per_query": sum(visited) / len(sets),
            "touched_entry_bytes": int(np.sum(offsets[words + 1] - offsets[words])) * (4 + SIGNATURE_BYTES),
            "recall1": float(np.mean(ranks <= 1)), "recall10": float(np.mean(ranks <= 10)), "copies": len(ranks)}


def _threads():
    import numba
    return numba.get_num_threads()


def step_cold(args):
    from vladkit.retrieval.asmk_index import ASMKIndex
    work = Path(args.workdir)
    sets, _ = load_queries(work / "queries.npz")
    # numba's kernels for memory-mapped (read-only) arrays, loaded from its cache on a
    # tiny index first: the cold query then times the page cache, not the compiler.
    from vladkit.kernels import asmk as kernels
    tiny = ASMKIndex().add(sets[:3], ["a", "b", "c"])
    tiny.save(work / "tiny")
    split, kernels.SPLIT_ENTRIES = kernels.SPLIT_ENTRIES, 0  # the kernel of one query over threads too
    ASMKIndex.load(work / "tiny").search(sets[:1], k=100)
    kernels.SPLIT_ENTRIES = split
    evict(work / "index")
    start = time.perf_counter()
    index = ASMKIndex.load(work / "index")
    index.search([sets[-1]], k=100)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    index.search([sets[-1]], k=100)
    return {"cold": cold, "again": time.perf_counter() - start}


def evict(folder):
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


STEPS = {"build": step_build, "search": step_search, "cold": step_cold}


def run_step(args, step):
    """``step`` in a fresh Python process; its JSON result."""
    command = [sys.executable, __file__, *sys.argv[1:], "--step", step]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the report ------------------------------------------------------------------------


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir())


def report(args, build, search, cold, index_bytes, shard_bytes, imbalance):
    mb = 2**20
    per_image = index_bytes / args.images
    scale = 10_000_000 / args.images
    rows = [
        ("images / words / distinct words per image", f"{args.images:,} / {args.words:,} / {build['n_entries'] / args.images:.0f}"),
        ("entries (word, image, 128-bit signature)", f"{build['n_entries']:,}"),
        ("word imbalance K sum p^2 (1 = uniform)", f"{imbalance:.2f}"),
        ("shards on disk (input)", f"{shard_bytes / 2**30:.2f} GiB in {args.images // args.shard_images + (args.images % args.shard_images > 0):,} files"),
        ("build wall time", f"{build['seconds']:.0f} s"),
        ("build peak resident memory (VmHWM, whole process)",
         f"{build['peak_rss'] / mb:,.0f} MiB: {build.get('rss_before', 0) / mb:,.0f} before the build + the build's "
         f"{(build['peak_rss'] - build.get('rss_before', 0)) / mb:,.0f} (budget {args.max_memory_bytes / mb:,.0f} MiB)"),
        ("build word-range passes / buffer", f"{build['passes']} / {build['buffer_bytes'] / mb:,.0f} MiB"),
        ("index on disk", f"{index_bytes / 2**30:.2f} GiB, {per_image:,.0f} bytes per image"),
        ("resident memory: at start / after imports / after load", f"{search['rss_start'] / mb:.0f} / {search['rss_imported'] / mb:.0f} / {search['rss_loaded'] / mb:.0f} MiB"),
        ("load time", f"{search['load_seconds'] * 1000:.0f} ms"),
        ("entries visited per query (mean)", f"{search['entries_per_query']:,.0f}"),
        ("warm query, one at a time (k = 100): median / p90 wall", f"{search['median'] * 1000:.1f} / {search['p90'] * 1000:.1f} ms"),
        ("warm query: median CPU time (all threads)", f"{search['cpu_median'] * 1000:.1f} ms on {search['threads']} threads"),
        ("cold query (files evicted; load + query) / same again", f"{cold['cold'] * 1000:.0f} / {cold['again'] * 1000:.1f} ms"),
        ("resident memory after the queries: all / anonymous", f"{search['rss_after_queries'] / mb:,.0f} / {search['anon_after_queries'] / mb:,.0f} MiB (the rest: mapped index pages, page cache)"),
        ("noisy copies: recall@1 / recall@10", f"{search['recall1']:.3f} / {search['recall10']:.3f} (of {search['copies']})"),
        ("index bytes touched by the queries (warm page cache)", f"{search['touched_entry_bytes'] / 2**30:.2f} GiB"),
        ("projection to 10M images: disk", f"{per_image * 1e7 / 2**30:.0f} GiB"),
        ("projection to 10M images: page cache for warm queries", f"~{search['touched_entry_bytes'] * scale / 2**30:.0f} GiB (the lists the queries read)"),
        ("projection to 10M images: build time, query", f"~{build['seconds'] * scale / 60:.0f} min (if the shards stay cached), query ~{search['median'] * scale * 1000:.0f} ms (lists 10x longer)"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]), width


def parse_memory(text):
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--words", type=int, default=65536)
    parser.add_argument("--per-image", type=int, default=300)
    parser.add_argument("--max-memory", default="2G")
    parser.add_argument("--workdir", default="/tmp/asmk-scale")
    parser.add_argument("--shard-images", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--zipf", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", help="also write the table (with the command, date and load) to this file")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_memory_bytes = parse_memory(args.max_memory)
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return
    work = Path(args.workdir)
    load_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average: ")[-1]
    cdf, words_of_rank, p = word_distribution(args.words, args.zipf, args.seed)
    try:
        if not (work / "queries.npz").is_file():
            start = time.perf_counter()
            write_shards(args, work / "shards", cdf, words_of_rank, draws_for(p, args.per_image))
            np.savez(work / "queries.npz", **make_queries(args, shard_list(work / "shards"), cdf, words_of_rank))
            print(f"  data written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        build = run_step(args, "build")
        search = run_step(args, "search")
        cold = run_step(args, "cold")
        table, _ = report(args, build, search, cold, folder_bytes(work / "index"), folder_bytes(work / "shards"),
                          float(args.words * np.sum(p ** 2)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    shown = [a for a, before in zip(sys.argv[1:], ["", *sys.argv[1:]]) if a != "--out" and before != "--out"]
    command = "python benchmarks/bench_asmk_scale.py " + " ".join(shown)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = (f"Command: `{command}`\n\nDate: {datetime.date.today()}; machine: {platform.machine()}, "
            f"{os.cpu_count()} cores; load at the start: {load_start}; at the end (`uptime`): {load}\n\n{table}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
