"""Does learning help? NetVLAD trained on dense RootSIFT against k-means VLAD (issue 13).

    python benchmarks/bench_netvlad.py [--data ../shared/data/scene15] [--quick]
        [--out benchmarks/results] [--threads 2] [--seed 0] [--scratch DIR]

Same descriptors (dense RootSIFT, bench_scene15.py's extractor), same K (64), held-out
data. The baseline, "VLAD K=64", is bench_scene15.py's (k-means on 300,000 training
descriptors, signed square root + intra + L2). "NetVLAD init" is the untrained layer
(k-means on 50,000 descriptors, MATLAB's v1/v2 initialisation): what learning starts from.

1. **15-Scene classification.** NetVLAD is trained on ``train/`` with the class labels as
   groups (:func:`vladkit.netvlad.training.train_netvlad`), each image a set of at most
   ``--per-image`` (1,000) of its descriptors, drawn once at random; test images are never
   seen. Every encoder then encodes every descriptor of every image
   (:class:`vladkit.NetVLADEncoder`, alone and inside :class:`vladkit.SpatialPyramid`,
   1x1 + 2x2 + 1x3); bench_scene15.py's protocol scores it (linear SVM on the precomputed
   kernel, C by 5-fold cross-validation on ``train/``, balanced accuracy on ``test/``;
   its RowFile / gram / choose_c_and_score).
2. **Near-duplicate retrieval.** NetVLAD is trained without labels: each ``train/`` image
   and ``--copies`` (4) attacked copies of it (:func:`vladkit.netvlad.training.attacked_copies`,
   the demo's attacks of :data:`vladkit.datasets.ATTACKS`) form a group. The benchmark is
   built from ``test/`` images only (``--near-duplicates`` of them, the same number from
   each class) by :func:`vladkit.datasets.near_duplicate_set`: the originals and 3
   mirrored-crop distractors each are the database, the 7 attacks of each original the
   queries. mAP and recall@1 (vladkit.retrieval.metrics), uncompressed (exact inner-product
   search) and at 64 bytes per image (PCA-whitening to 256 dimensions with exponent 0.25,
   then PQ 64x8: ``vladkit demo``'s settings), whitening and quantizer learnt on the
   vectors of the ``train/`` images and their attacked copies.
3. **Training time** of each NetVLAD (wall clock, ``--threads`` torch threads, the load
   average of the machine alongside: a shared machine inflates it).

Memory stays bounded: training keeps ``--per-image`` descriptors per image (float16); the
pyramid vectors go to float16 files in a scratch folder (as in bench_scene15.py), the
near-duplicate vectors stay in memory (float16).

Writes ``netvlad.md`` into --out. ``--quick``: a few images per class, K = 16, two epochs,
a few near-duplicates: a smoke test of a few minutes that the whole pipeline runs.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_scene15 import LEVELS, RowFile, choose_c_and_score, gram, peak_memory_mb

from vladkit import (
    DenseSIFT,
    DescriptorSampler,
    KMeansVocabulary,
    PCAWhitening,
    SpatialPyramid,
    VectorIndex,
    VLADEncoder,
    labelled_images,
    read_image,
)
from vladkit.datasets.near_duplicates import near_duplicate_set
from vladkit.app.demo import PCA_DIM, WHITEN
from vladkit.encoders.netvlad import NetVLADEncoder
from vladkit.encoders.netvlad_params import save_netvlad
from vladkit.retrieval.metrics import mean_average_precision, recall_at_k

PQ_CODE = "64x8"  # 64 bytes per image

#: The training recipes, measured (see the results file): labels (15-Scene classes) and
#: attacked copies (near duplicates).
LABELLED = dict(init="v2", loss="classification", epochs=8, lr=1e-3, batch_size=16, descriptors_per_step=500)
UNLABELLED = dict(init="v2", loss="triplet", epochs=6, lr=1e-3, batch_size=8, descriptors_per_step=500,
                  queries_per_epoch=1498)


def load():
    return "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few images per class, small K")
    parser.add_argument("--per-class", type=int, default=4, help="images per class with --quick (default 4)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for netvlad.md")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    parser.add_argument("--per-image", type=int, default=1000,
                        help="descriptors kept per training image for training (default 1000)")
    parser.add_argument("--per-copy", type=int, default=500,
                        help="descriptors kept per attacked copy for training (default 500)")
    parser.add_argument("--copies", type=int, default=4, help="attacked copies per train/ image (default 4)")
    parser.add_argument("--near-duplicates", type=int, default=600,
                        help="test/ images in the near-duplicate benchmark (default 600, 40 per class)")
    parser.add_argument("--epochs", type=int, default=None, help="override both recipes' epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per extraction batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", help="folder for the vectors on disk (default: a temporary folder)")
    parser.add_argument("--save", help="folder to also save the trained NetVLAD files into")
    parser.add_argument("--cache", help="folder to keep pass 1 (the training descriptors) in, for reruns")
    parser.add_argument("--only", choices=("classification", "near-duplicates"), default=None,
                        help="run one of the two measurements")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        parser.error("needs torch (pip install torch==2.14.1 torchvision==0.29.1, then pip install '.[torch]')")
    with tempfile.TemporaryDirectory(prefix="netvlad-", dir=args.scratch) as scratch:
        return run(args, parser, Path(scratch))


def subsample(descriptors, n, seed, index):
    if len(descriptors) > n:
        rows = np.random.default_rng([seed, 40, index]).choice(len(descriptors), n, replace=False)
        descriptors = descriptors[np.sort(rows)]
    return descriptors.astype(np.float16)


def split_rows(rows, lengths):
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [rows[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def extract_training_sets(args, extractor, train_paths, copies, quick):
    """Pass 1 over train/: the baseline's vocabulary sample (bench_scene15's: 300,000
    descriptors), a bounded subset of every image's descriptors, and of its attacked copies'."""
    from vladkit.netvlad.training import attacked_copies

    sampler = DescriptorSampler(len(train_paths), 20_000 if quick else 300_000, seed=args.seed)
    sets, copy_sets = [], []
    for first in range(0, len(train_paths), args.batch_size):
        batch = train_paths[first:first + args.batch_size]
        for offset, features in enumerate(extractor.transform(batch)):
            index = first + offset
            sampler.add(index, features.descriptors)
            sets.append(subsample(features.descriptors, args.per_image, args.seed, index))
        for offset, path in enumerate(batch if args.only != "classification" else []):
            index = first + offset
            image = read_image(path, mode="rgb", max_side=extractor.max_side)
            made = [copy for _, copy in attacked_copies(image, copies, seed=args.seed, index=index)]
            copy_sets.append([subsample(f.descriptors, args.per_copy, args.seed, len(train_paths) * (1 + j) + index)
                              for j, f in enumerate(extractor.transform(made))])
        print(f"  pass 1: {first + len(batch)}/{len(train_paths)} images", end="\r", flush=True)
    print()
    return sampler.sample(), sets, copy_sets


def train(name, sets, groups, recipe, args, timings, k):
    """(initialisation, trained) NetVLADEncoders; the wall time of both (k-means included)."""
    from vladkit.netvlad.training import train_netvlad

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    options = dict(n_clusters=k, validation=0.1, random_state=args.seed, n_threads=args.threads)
    initial = train_netvlad(sets, groups, **options, init=recipe["init"], epochs=0, progress=False)
    recipe = {key: value for key, value in recipe.items() if key != "init"}
    params = train_netvlad(sets, groups, **options, **recipe, init=initial, progress=sys.stderr.isatty(),
                           log=lambda line: print(f"    {line}", flush=True))
    seconds = time.perf_counter() - start
    timings[name] = (seconds, load_before, os.getloadavg()[0], len(sets))
    print(f"  {name}: trained in {seconds:.0f} s (epoch {params.metadata['training']['returned_epoch']} "
          f"kept), {load()}", flush=True)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        save_netvlad(params, Path(args.save) / f"{name.replace(' ', '_')}.npz")
        save_netvlad(initial, Path(args.save) / f"{name.replace(' ', '_')}_init.npz")
    return tuple(NetVLADEncoder(p).fit([np.zeros((1, p.dim), np.float32)]) for p in (initial, params))


def run(args, parser, scratch):
    quick = args.quick
    per_class = args.per_class if quick else None
    k = 16 if quick else 64
    data = Path(args.data)
    train_paths, y_train, classes = labelled_images(data / "train", per_class)
    test_paths, y_test, _ = labelled_images(data / "test", per_class)
    if not train_paths or not test_paths:
        parser.error(f"no images under {data}/train and {data}/test")
    labelled, unlabelled = dict(LABELLED), dict(UNLABELLED)
    if quick or args.epochs is not None:
        labelled["epochs"] = unlabelled["epochs"] = 2 if args.epochs is None else args.epochs
    copies = min(args.copies, 2) if quick else args.copies
    print(f"15-Scene: {len(train_paths)} train / {len(test_paths)} test images, {len(classes)} classes; "
          f"{os.cpu_count()} cores, {load()}", flush=True)
    extractor = DenseSIFT(root=True, n_jobs=-1)
    timings, started = {}, time.perf_counter()

    # Pass 1 over train/: the baseline's vocabulary sample, the training descriptors.
    from vladkit.netvlad.training import copy_groups

    start = time.perf_counter()
    cache = None
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache) / (f"pass1-{len(train_paths)}-{args.per_image}-{args.per_copy}-"
                                    f"{0 if args.only == 'classification' else copies}-"
                                    f"{args.seed}.npz")
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            sample = stored["sample"]
            sets = split_rows(stored["sets"], stored["set_lengths"])
            copy_sets = split_rows(stored["copies"], stored["copy_lengths"])
        copy_sets = [copy_sets[i:i + copies] for i in range(0, len(copy_sets), copies)]
        print(f"pass 1 read from {cache}")
    else:
        sample, sets, copy_sets = extract_training_sets(args, extractor, train_paths, copies, quick)
        if cache is not None:
            flat = [s for made in copy_sets for s in made]
            np.savez(cache, sample=sample, sets=np.concatenate(sets), set_lengths=[len(s) for s in sets],
                     copies=np.concatenate(flat) if flat else np.zeros((0, 128), np.float16),
                     copy_lengths=[len(s) for s in flat])
    timings["extraction, train/ and copies"] = time.perf_counter() - start
    print(f"pass 1: {len(sample):,} descriptors sampled, {sum(map(len, sets)):,} kept for training, "
          f"{len(train_paths) * copies} copies, in {timings['extraction, train/ and copies']:.0f} s", flush=True)

    vocabulary = KMeansVocabulary(k, random_state=args.seed).fit_sample(sample)
    del sample
    vlad = {f"VLAD K={k}": VLADEncoder(vocabulary=vocabulary).fit([np.zeros((1, 128), np.float32)])}

    # Training, with labels (classification) and without (near duplicates); each run's
    # initialisation is encoded too (what learning started from).
    classification = retrieval = None
    if args.only != "near-duplicates":
        initial, params = train("NetVLAD labels", sets, y_train, labelled, args, timings, k)
        classification = run_classification(args, extractor, {
            **vlad, f"NetVLAD K={k} init ({labelled['init']}, untrained)": initial,
            f"NetVLAD K={k} trained on labels": params}, train_paths, y_train, test_paths, y_test, scratch)
    if args.only != "classification":
        unlabelled_sets = [s for original, made in zip(sets, copy_sets) for s in [original, *made]]
        del sets, copy_sets
        initial, params = train("NetVLAD copies", unlabelled_sets, copy_groups(len(train_paths), copies),
                                unlabelled, args, timings, k)
        del unlabelled_sets
        retrieval = run_near_duplicates(args, extractor, {
            **vlad, f"NetVLAD K={k} init ({unlabelled['init']}, untrained)": initial,
            f"NetVLAD K={k} trained on attacked copies": params}, train_paths, test_paths, y_test, copies, quick)
    write_results(args, classification, retrieval, timings, time.perf_counter() - started,
                  len(train_paths), len(test_paths), k, labelled, unlabelled, copies)
    return 0


def run_classification(args, extractor, encoders, train_paths, y_train, test_paths, y_test, scratch):
    """bench_scene15's protocol for every encoder, alone and in the pyramid."""
    pyramids = {name: SpatialPyramid(encoder, levels=LEVELS).fit([np.zeros((1, 128), np.float32)])
                for name, encoder in encoders.items()}
    stored = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        for first in range(0, len(paths), args.batch_size):
            features = extractor.transform(paths[first:first + args.batch_size])
            for name, pyramid in pyramids.items():
                key = (name, split)
                vectors = pyramid.transform(features)
                if key not in stored:
                    stored[key] = RowFile(scratch / f"{len(stored)}.f16", vectors.shape[1])
                stored[key].append(vectors)
            print(f"  classification, {split}: {first + len(features)}/{len(paths)} images, "
                  f"peak memory {peak_memory_mb():,.0f} MB", end="\r", flush=True)
        print()
    results = []
    for name, pyramid in pyramids.items():
        train, test = stored.pop((name, "train")), stored.pop((name, "test"))
        block = pyramid.encoder_.n_features_out_
        for variant, columns in ((name, block), (name + " + SPM", None)):
            accuracy, C, _ = choose_c_and_score(gram(train, train, columns), y_train,
                                                gram(test, train, columns), y_test, args.seed)
            results.append((variant, columns or train.dim, accuracy, C))
            print(f"  {variant}: balanced accuracy {100 * accuracy:.1f}% (C={C})", flush=True)
        train.close()
        test.close()
    return results


def run_near_duplicates(args, extractor, encoders, train_paths, test_paths, y_test, copies, quick):
    """mAP / recall@1 on near duplicates of test/ images, exact and at 64 bytes."""
    from vladkit.netvlad.training import attacked_copies

    n_classes = len(np.unique(y_test))
    per_class = max(1, (2 if quick else args.near_duplicates) // n_classes)
    chosen = [i for c in range(n_classes) for i in np.flatnonzero(y_test == c)[:per_class]]
    photos = [(str(Path(test_paths[i]).relative_to(Path(args.data))),
               read_image(test_paths[i], mode="rgb", max_side=extractor.max_side)) for i in chosen]
    data = near_duplicate_set(photos, distractors_per_photo=3, learning_per_photo=0, seed=args.seed)
    database_ids = [name for name, _ in data.database]
    query_ids = [name for name, _, _ in data.queries]
    print(f"near duplicates: {len(photos)} test/ originals, {len(database_ids)} database images, "
          f"{len(query_ids)} queries", flush=True)

    def encode_all(images):
        out = {name: [] for name in encoders}
        for first in range(0, len(images), args.batch_size):
            features = extractor.transform(images[first:first + args.batch_size])
            for name, encoder in encoders.items():
                out[name].append(encoder.transform(features).astype(np.float16))
        return {name: np.concatenate(parts) for name, parts in out.items()}

    database = encode_all([image for _, image in data.database])
    queries = encode_all([image for _, image, _ in data.queries])
    # Learning set for the whitening and the quantizer: train/ images and their copies.
    learning = {name: [] for name in encoders}
    for first in range(0, len(train_paths), args.batch_size):
        images = []
        for index in range(first, min(first + args.batch_size, len(train_paths))):
            image = read_image(train_paths[index], mode="rgb", max_side=extractor.max_side)
            images += [image] + [c for _, c in attacked_copies(image, copies, seed=args.seed, index=index)]
        part = encode_all(images)
        for name in encoders:
            learning[name].append(part[name])
        print(f"  near duplicates, learning set: {min(first + args.batch_size, len(train_paths))}/"
              f"{len(train_paths)} train/ images and copies", end="\r", flush=True)
    print()
    learning = {name: np.concatenate(parts).astype(np.float32) for name, parts in learning.items()}
    n_learning = len(next(iter(learning.values())))
    # 64 sub-quantizers of 8 bits (--quick: fewer bits and dimensions if there are too few
    # learning vectors for 256 centroids or 256 components).
    m, bits = (int(part) for part in PQ_CODE.split("x"))
    bits = min(bits, int(np.log2(n_learning)))
    pca_dim = max(m, min(PCA_DIM, (n_learning - 1) // m * m))
    pq_code = f"{m}x{bits}"
    results = []
    for name in encoders:
        X_db, X_q = database[name].astype(np.float32), queries[name].astype(np.float32)
        whitening = PCAWhitening(pca_dim, whiten=WHITEN, random_state=args.seed).fit(learning[name])
        indexes = [("exact", VectorIndex("flat")), (f"PCA-{pca_dim} + PQ {pq_code}",
                                                    VectorIndex("pq", pq=pq_code, whitening=whitening))]
        for variant, index in indexes:
            if index.kind != "flat":
                index.train(learning[name])
            index.add(X_db, database_ids)
            _, ranked = index.search(X_q, k=len(index))
            rankings = dict(zip(query_ids, ranked))
            mAP = mean_average_precision(rankings, data.ground_truth)
            r1 = recall_at_k(rankings, data.ground_truth, k=1)[1]
            results.append((name, variant, index.bytes_per_vector, mAP, r1))
            print(f"  {name}, {variant}: mAP {mAP:.3f}, recall@1 {r1:.3f}", flush=True)
    return results, len(photos), len(database_ids), len(query_ids)


def write_results(args, classification, retrieval, timings, total, n_train, n_test, k, labelled, unlabelled,
                  copies):
    lines = [
        f"NetVLAD on dense RootSIFT (step 4, sizes 4/6/8/10), K = {k}: learning against k-means VLAD, "
        f"held-out data. `python benchmarks/bench_netvlad.py{' --quick' if args.quick else ''}`; "
        f"{os.cpu_count()} cores, {args.threads} torch threads, seed {args.seed}; total {total / 60:.0f} min, "
        f"peak resident memory {peak_memory_mb():,.0f} MB.",
        "",
        f"Recipes: labels `{labelled}`; attacked copies ({copies} per image) `{unlabelled}`; "
        f"{args.per_image} descriptors kept per training image, 10% of the training sets held out "
        "for validation (the epoch with the best validation mAP is kept).",
    ]
    if classification is not None:
        lines += [
            "",
            f"### 15-Scene classification ({n_train} train / {n_test} test images, linear SVM, balanced accuracy)",
            "",
            "| encoding | dim | balanced accuracy | C |",
            "|---|---|---|---|",
        ]
        lines += [f"| {name} | {dim:,} | {100 * accuracy:.1f}% | {C:g} |"
                  for name, dim, accuracy, C in classification]
    if retrieval is not None:
        retrieval, n_photos, n_database, n_queries = retrieval
        lines += [
            "",
            f"### Near-duplicate retrieval ({n_photos} test/ originals + {n_database - n_photos} distractors, "
            f"{n_queries} attacked queries)",
            "",
            "| encoding | index | bytes / image | mAP | recall@1 |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {name} | {variant} | {size:,} | {mAP:.3f} | {r1:.3f} |"
                  for name, variant, size, mAP, r1 in retrieval]
    lines += ["", "### Training time", "", "| run | sets | wall time | load average before / after |",
              "|---|---|---|---|"]
    for name, value in timings.items():
        if isinstance(value, tuple):
            seconds, before, after, n_sets = value
            lines.append(f"| {name} | {n_sets:,} | {seconds / 60:.1f} min | {before:.1f} / {after:.1f} |")
        else:
            lines.append(f"| {name} | | {value / 60:.1f} min | |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "netvlad" + ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    (out / f"{name}.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
