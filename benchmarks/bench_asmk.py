"""Selective match kernels against the reference package ``asmk``, side by side in one run.

    python benchmarks/bench_asmk.py [--data ../shared/data/scene15] [--cache bench-retrieval-cache]
        [--words 4096 16384] [--replicas 10] [--replica-words 4096] [--ef-search 16 32]
        [--time-training 16384] [--out benchmarks/results/asmk.md]

The set is bench_retrieval.py's (the same cache folder and construction: 1,200 15-Scene
test photos as the database, 80 strongly attacked copies as queries: crops of 50-70 %,
rotations of +-25 degrees, scales 0.6-1.4, JPEG quality 10-25, half of them blurred).
Sparse RootSIFT (``vladkit.SIFT(root=True)``) of the database, the queries and the
15-Scene ``train/`` photos (the codebook's training descriptors), cached in the folder.

For each codebook size, one codebook (faiss k-means, 10 iterations, as the package
trains it; cached in the folder, its training time printed when it is trained) serves
both sides, and for each of ASMK* (binary) and ASMK:

* vladkit: ``ASMKEncoder`` (m = 1 for the database, 5 for queries; exact words,
  ``quantizer="flat"``) and ``ASMKIndex``; for ASMK* also ``quantizer="hnsw"`` at each
  ``--ef-search`` (approximate words) and ``binarize="median"`` (the MATLAB original's
  per-word medians, learnt on the training descriptors);
* the package: ``ASMKMethod.build_ivf`` and ``query_ivf`` with the parameters of
  ../shared/reference/asmk-semantics.md (alpha 3, tau 0, no idf, m = 1 / 5).

``--time-training N`` trains an N-word codebook on the training descriptors both ways,
timed side by side: the package's ``ASMKMethod.train_codebook`` (faiss ``Clustering``, 10
iterations, every descriptor) and ``KMeansVocabulary(N, algorithm="faiss", max_iter=10,
max_descriptors=<all>)`` (the same work; then its float64 assignment of the sample for
the inertia, timed apart). The times are kept in the cache folder
(``asmk-training-N-seedS.json``, with the date and load) and printed by later runs; the
vladkit codebook becomes the cached N-word codebook if there is none.

Reported: recall@1/10/100 and mAP over every query (a query the package cannot take,
having no keypoints, counts as a miss for it), the index's bytes per image, the time to
quantise the database's descriptors (the package: faiss's flat L2 search, float32;
vladkit: BLAS products and the float64 nearest word, or the HNSW graph's candidates ranked
in float64), the time to build the inverted file from the words (aggregation and the
lists: the package's ``aggregate`` and ``IVF.add``), and the median time per query
(quantisation, aggregation and search, one query at a time; for vladkit also the medians
of the encoding and of the search apart, and the time per query of all queries in one
call). Each side quantises 1,000 rows and runs one query before it is timed (loading
faiss, numba's cached kernels). With ``--replicas R`` the database is replicated R times
with jittered descriptors (each copy a new image) to time both at R x 1,200 images (for
the codebooks of ``--replica-words``). The threads are as the machine gives them (2
cores here); the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_retrieval import build_set  # noqa: E402 (the same set, built once in the same cache)

from vladkit import SIFT, KMeansVocabulary, list_images  # noqa: E402
from vladkit.encoders.asmk import ASMKEncoder  # noqa: E402
from vladkit.retrieval.asmk_index import ASMKIndex  # noqa: E402


def descriptors(paths, cache_file):
    """Sparse RootSIFT of each image (a list of (n_i, 128) float32), cached."""
    if cache_file.is_file():
        with np.load(cache_file) as archive:
            counts, rows = archive["counts"], archive["rows"]
        return np.split(rows, np.cumsum(counts)[:-1])
    sets = [f.descriptors for f in SIFT(root=True).transform([str(p) for p in paths])]
    np.savez(cache_file, counts=np.array([len(s) for s in sets]), rows=np.vstack(sets))
    return sets


def faiss_codebook(train, n_words, seed=0):
    """k-means as the package trains it: faiss Clustering, 10 iterations."""
    import faiss

    clustering = faiss.Clustering(train.shape[1], n_words)
    clustering.niter, clustering.seed, clustering.verbose = 10, seed, False
    clustering.train(np.ascontiguousarray(train, dtype=np.float32), faiss.IndexFlatL2(train.shape[1]))
    return faiss.vector_float_to_array(clustering.centroids).reshape(n_words, train.shape[1])


def metrics(rankings, positives):
    """recall@1/10/100 and mAP (one positive per query: AP = 1 / its rank, 0 if absent)."""
    ranks = []
    for ranked, positive in zip(rankings, positives):
        ranks.append(ranked.index(positive) + 1 if positive in ranked else None)
    recall = {k: np.mean([r is not None and r <= k for r in ranks]) for k in (1, 10, 100)}
    return recall, float(np.mean([1.0 / r if r else 0.0 for r in ranks]))


def run_vladkit(centers, binary, database, queries, ids, train_sets=None, **params):
    """(quantisation s, aggregation + inverted file s, per-query s, rankings, bytes per image,
    extra: encode / search medians and the batched time per query)."""
    encoder = ASMKEncoder(KMeansVocabulary.from_centers(centers), binary=binary, **params).fit(train_sets)
    rows = np.vstack([s for s in database if len(s)])
    encoder._assign(rows[:1000], 1)  # warm: numba's cached kernels, faiss
    start = time.perf_counter()
    assignments = encoder._assign(rows, 1)
    quantise = time.perf_counter() - start
    assign, cursor = encoder._assign, [0]

    def computed(X, m):  # the database's words, computed above, group after group
        cursor[0] += len(X)
        return assignments[cursor[0] - len(X):cursor[0]]

    encoder._assign = computed
    start = time.perf_counter()
    index = ASMKIndex().add(encoder.transform(database), ids)
    index._layout()
    build = time.perf_counter() - start
    encoder._assign = assign
    index.search(encoder.transform_queries([queries[0]]), k=100)  # warm
    times, encode_times, search_times, rankings = [], [], [], []
    for query in queries:
        start = time.perf_counter()
        encoded = encoder.transform_queries([query])
        middle = time.perf_counter()
        _, found = index.search(encoded, k=100)
        end = time.perf_counter()
        times.append(end - start)
        encode_times.append(middle - start)
        search_times.append(end - middle)
        rankings.append(found[0])
    index.search(encoder.transform_queries(queries), k=100)  # warm: the parallel kernels
    start = time.perf_counter()
    index.search(encoder.transform_queries(queries), k=100)
    batched = (time.perf_counter() - start) / len(queries)
    arrays = index._arrays
    size = sum(np.asarray(arrays[key]).nbytes for key in arrays)
    extra = {"encode": float(np.median(encode_times)), "search": float(np.median(search_times)), "batched": batched}
    return quantise, build, times, rankings, size / len(ids), extra


def run_package(centers, binary, database, queries, ids):
    try:
        from asmk import asmk_method, codebook as codebook_module, index as index_module
    except ImportError:
        return None
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": len(centers)}},
              "build_ivf": {"kernel": {"binary": binary}, "ivf": {"use_idf": False},
                            "quantize": {"multiple_assignment": 1}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": 100},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    codebook = codebook_module.Codebook(index_module.initialize_index(None), size=len(centers))
    codebook.index(np.ascontiguousarray(centers, dtype=np.float32))
    method = asmk_method.ASMKMethod(params, {}, codebook=codebook)
    kept = [i for i, s in enumerate(database) if len(s)]
    builder = method.create_ivf_builder()
    codebook.quantize(database[kept[0]][:1000], multiple_assignment=1)  # warm, as vladkit's
    start = time.perf_counter()
    quantized = codebook.quantize(np.vstack([database[i] for i in kept]),
                                  np.repeat(np.arange(len(kept)), [len(database[i]) for i in kept]),
                                  **params["build_ivf"]["quantize"])
    quantise = time.perf_counter() - start
    start = time.perf_counter()
    builder.ivf.add(*builder.kernel.aggregate(*quantized, **params["build_ivf"]["aggregate"]))
    build = time.perf_counter() - start
    method = method.add_ivf_builder(builder)
    first = next(q for q in queries if len(q))
    method.query_ivf(first, np.zeros(len(first), dtype=np.int64))  # warm, as vladkit's
    times, rankings = [], []
    for query in queries:
        if not len(query):
            rankings.append([])  # the package cannot take a query without descriptors
            continue
        start = time.perf_counter()
        _, _, ranks, _ = method.query_ivf(query, np.zeros(len(query), dtype=np.int64))
        times.append(time.perf_counter() - start)
        rankings.append([ids[kept[j]] for j in ranks[0].tolist()])
    return quantise, build, times, rankings, None, None


def time_training(train, n_words, seed, root):
    """The package's ``train_codebook`` and vladkit's faiss k-means on the same descriptors,
    one after the other; the times (and vladkit's float64 inertia pass apart) are written
    to the cache folder. Returns (record, vladkit's centers)."""
    from asmk import asmk_method
    from vladkit.vocabulary.kmeans import _assignment_inertia

    load = os.getloadavg()[0]
    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": n_words}}}
    start = time.perf_counter()
    asmk_method.ASMKMethod.initialize_untrained(params).train_codebook(train)
    package = time.perf_counter() - start
    print(f"codebook {n_words}: asmk 0.1.1 train_codebook {package:.0f} s", flush=True)
    vocabulary = KMeansVocabulary(n_words, algorithm="faiss", max_iter=10, max_descriptors=len(train),
                                  random_state=seed)
    start = time.perf_counter()
    vocabulary.fit([train])
    ours = time.perf_counter() - start
    print(f"codebook {n_words}: vladkit KMeansVocabulary(faiss, 10 iterations) {ours:.0f} s", flush=True)
    start = time.perf_counter()
    _assignment_inertia(train, vocabulary.centers_)
    inertia = time.perf_counter() - start
    record = {"words": n_words, "descriptors": len(train), "asmk": package, "vladkit": ours,
              "vladkit_inertia_pass": inertia, "iterations": int(vocabulary.n_iter_),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load": [load, os.getloadavg()[0]]}
    (root / f"asmk-training-{n_words}-seed{seed}.json").write_text(json.dumps(record), encoding="utf-8")
    return record, vocabulary.centers_


def training_line(record):
    return (f"codebook training, {record['words']:,} words on {record['descriptors']:,} descriptors, 10 iterations "
            f"(measured {record['date']}, load {record['load'][0]:.1f} -> {record['load'][1]:.1f}): "
            f"asmk 0.1.1 train_codebook {record['asmk']:.0f} s; vladkit KMeansVocabulary(algorithm='faiss', "
            f"max_iter=10) {record['vladkit']:.0f} s, of which its float64 assignment for the inertia "
            f"~{record['vladkit_inertia_pass']:.0f} s (timed again apart)")


def jittered(sets, replicas, seed=0):
    """The database R times: copy r > 0 of each descriptor set moved by Gaussian noise of
    1 % of the descriptors' spread (a different image with the same words, mostly)."""
    rng = np.random.default_rng(seed)
    spread = float(np.std(np.vstack([s for s in sets if len(s)])))
    out = list(sets)
    for _ in range(1, replicas):
        out += [(s + rng.normal(scale=0.01 * spread, size=s.shape)).astype(np.float32) for s in sets]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"))
    parser.add_argument("--cache", default="bench-retrieval-cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", type=int, default=1200)
    parser.add_argument("--queries", type=int, default=80)
    parser.add_argument("--words", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--replicas", type=int, default=0, help="also time R x the database (jittered copies)")
    parser.add_argument("--replica-words", type=int, nargs="*", default=[4096],
                        help="the codebooks the replicated database is timed with")
    parser.add_argument("--ef-search", type=int, nargs="*", default=[16, 32],
                        help="vladkit rows with quantizer='hnsw' at these efSearch (ASMK*)")
    parser.add_argument("--time-training", type=int, nargs="*", default=[],
                        help="train codebooks of these sizes both ways, timed (kept in the cache folder)")
    parser.add_argument("--out", default=None, help="markdown file for the tables")
    args = parser.parse_args(argv)
    args.set = "scene15"
    root = Path(args.cache) / "scene15"
    _, truth = build_set(root, args)
    database_paths = sorted(p for p in (root / "database").rglob("*") if p.is_file())
    ids = [str(p.relative_to(root)) for p in database_paths]
    query_names = sorted(truth)
    positives = [truth[name] for name in query_names]
    database = descriptors(database_paths, root / "asmk-database-rootsift.npz")
    queries = descriptors([root / name for name in query_names], root / "asmk-queries-rootsift.npz")
    train_sets = descriptors(list_images(Path(args.data) / "train", recursive=True), root / "asmk-train-rootsift.npz")
    train = np.vstack(train_sets)
    print(f"descriptors: {len(train):,} training, {sum(map(len, database)):,} database ({len(database)} images), "
          f"{sum(map(len, queries)):,} queries ({len(queries)}; {sum(1 for q in queries if not len(q))} without any)",
          flush=True)
    lines = ["| codebook | kernel | implementation | recall@1 | recall@10 | recall@100 | mAP | bytes / image | "
             "quantisation (s) | inverted file from words (s) | query (ms, median) | encode + search (ms, medians) | "
             "all queries in one call (ms / query) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    timing = []
    for n_words in args.time_training:
        record, centers = time_training(train, n_words, args.seed, root)
        cached = root / f"asmk-codebook-{n_words}-seed{args.seed}.npy"
        if not cached.is_file():
            np.save(cached, centers)
    for n_words in args.words:
        cached = root / f"asmk-codebook-{n_words}-seed{args.seed}.npy"
        if cached.is_file():
            centers = np.load(cached)
        else:
            start = time.perf_counter()
            centers = faiss_codebook(train, n_words, args.seed)
            np.save(cached, centers)
            timing.append(f"codebook {n_words}: faiss k-means (10 iterations) {time.perf_counter() - start:.0f} s")
            print(timing[-1], flush=True)
        record = root / f"asmk-training-{n_words}-seed{args.seed}.json"
        if record.is_file():
            timing.append(training_line(json.loads(record.read_text(encoding="utf-8"))))
            print(timing[-1], flush=True)
        for binary in (True, False):
            kernel = "ASMK*" if binary else "ASMK"
            runs = [("vladkit", run_vladkit, {})]
            if binary:
                runs += [(f"vladkit, hnsw efSearch {ef}", run_vladkit, {"quantizer": "hnsw", "ef_search": ef})
                         for ef in args.ef_search]
                runs.append(("vladkit, median (MATLAB)", run_vladkit, {"binarize": "median", "train_sets": train_sets}))
            runs.append(("asmk 0.1.1", run_package, {}))
            for name, runner, params in runs:
                result = runner(centers, binary, database, queries, ids, **params)
                if result is None:
                    lines.append(f"| {n_words} | {kernel} | {name} | not installed | | | | | | | | | |")
                    continue
                quantise, build, times, rankings, size, extra = result
                recall, average = metrics(rankings, positives)
                split = "" if extra is None else f"{1000 * extra['encode']:.2f} + {1000 * extra['search']:.2f}"
                batched = "" if extra is None else f"{1000 * extra['batched']:.2f}"
                lines.append(f"| {n_words} | {kernel} | {name} | {recall[1]:.3f} | {recall[10]:.3f} | "
                             f"{recall[100]:.3f} | {average:.3f} | {'' if size is None else f'{size:,.0f}'} | "
                             f"{quantise:.2f} | {build:.2f} | {1000 * np.median(times):.2f} | {split} | {batched} |")
                print(lines[-1], f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if args.replicas > 1 and n_words in args.replica_words:
                big = jittered(database, args.replicas)
                big_ids = [f"{r}/{i}" for r in range(args.replicas) for i in ids]
                big_runs = [("vladkit", run_vladkit, {})]
                if binary:
                    big_runs += [(f"vladkit, hnsw efSearch {ef}", run_vladkit, {"quantizer": "hnsw", "ef_search": ef})
                                 for ef in args.ef_search[-1:]]
                big_runs.append(("asmk 0.1.1", run_package, {}))
                for name, runner, params in big_runs:
                    result = runner(centers, binary, big, queries[:20], big_ids, **params)
                    if result is not None:
                        extra = result[5]
                        split = "" if extra is None else (f" (encode {1000 * extra['encode']:.2f} + search "
                                                          f"{1000 * extra['search']:.2f})")
                        timing.append(f"{n_words} {kernel} {name}, {len(big):,} images: "
                                      f"quantisation {result[0]:.1f} s, "
                                      f"inverted file from words {result[1]:.1f} s, "
                                      f"query {1000 * np.median(result[2]):.2f} ms{split} (medians of 20; "
                                      f"load {os.getloadavg()[0]:.1f})")
                        print(timing[-1], flush=True)
                del big
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = "\n".join(lines + [""] + timing + ["", f"peak resident memory of the run: {peak:,.0f} MB; "
                                                  f"load average at the end: {os.getloadavg()[0]:.1f}"])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
