"""Training on images, end to end (issue 33): a CNN trained through NetVLAD from random
initialisation on attacked copies of 15-Scene ``train/``, against RootSIFT VLAD.

    python benchmarks/bench_netvlad_images.py [--data ../shared/data/scene15] [--quick]
        [--out benchmarks/results] [--threads 2] [--seed 0]

- **Network**: ``build_backbone("resnet18")`` cut at layer3 (256 channels, stride 16),
  *random* weights (no pretrained ones: nothing is downloaded), on ``--image-size``
  (96) px images, so 6 x 6 local descriptors per image; NetVLAD with ``--k`` (32)
  clusters initialised from k-means on the backbone's descriptors
  (:func:`vladkit.netvlad.init_netvlad_from_images`, "v2"). BatchNorm keeps its initial
  statistics (mean 0, variance 1) and is frozen in training (``batchnorm="frozen"``): on a
  small validation set that start retrieved better than statistics estimated on the images.
- **Training** (:func:`vladkit.netvlad.train_on_images`): ``--train-photos`` ``train/``
  photos (the same number from each class), each with ``--copies`` attacked copies
  (:class:`vladkit.netvlad.ImageGroupsDataset`, the Copydays-style attacks of
  :data:`vladkit.datasets.ATTACKS`) as its group; the paper's triplet loss (margin 0.1)
  with hard negatives mined from a cache refreshed every epoch, the epoch of the best
  validation mAP kept (validation: 3 other ``train/`` photos per class and their copies); random resized crops and
  brightness/contrast jitter, no flips (the benchmark's distractors are mirrored crops of
  the originals: a network taught that mirror images match would rank them first); Adam.
- **Evaluation**: bench_netvlad.py's near-duplicate retrieval, built the same way from
  ``test/`` (``--near-duplicates`` originals, the same number per class, read with
  DenseSIFT's ``max_side``; :func:`vladkit.datasets.near_duplicate_set` with 3 mirrored-crop
  distractors per original and seed ``--seed``): the originals and distractors are the
  database, the 7 attacks of each original the queries; exact inner-product search, mAP
  and recall@1. The CNN sees every image resized to cover the working size, centre crop.
- **Baseline**: RootSIFT VLAD K=64 as bench_netvlad.py computes it in the same run
  (DenseSIFT(root=True), k-means on 300,000 descriptors of ``train/``, VLADEncoder).

Writes ``netvlad_images.md`` into --out (``netvlad_images-quick.md`` with ``--quick``: a
few images, 64 px, K = 8, a few steps; a smoke test of seconds). Timings are wall clock on
a machine possibly shared: the load average before and after each row is recorded.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from vladkit import DenseSIFT, DescriptorSampler, KMeansVocabulary, VLADEncoder, labelled_images, read_image
from vladkit.datasets.near_duplicates import near_duplicate_set
from vladkit.retrieval.metrics import mean_average_precision, recall_at_k

#: The full run's recipe, sized to fit in ~25 minutes on 2 cores (measured at load 1-2:
#: an epoch of 150 steps of 4 tuples of 6 images ~60 s with its cache refresh; the whole
#: run 20 min). With 8 epochs (12 min) the validation mAP had not levelled off: 0.657 on
#: the benchmark, 0.712 with 16.
RECIPE = dict(loss="triplet", epochs=16, lr=1e-4, batch_size=4, n_negatives=4, negative_pool=300,
              queries_per_epoch=600, keep_best=True)
QUICK = dict(loss="triplet", epochs=1, lr=1e-4, batch_size=2, n_negatives=2, negative_pool=20,
             queries_per_epoch=4, keep_best=True)


def load():
    return os.getloadavg()[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few images, 64 px, K=8, a few steps")
    parser.add_argument("--out", default="benchmarks/results", help="folder for netvlad_images.md")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="working size in pixels (default 96)")
    parser.add_argument("--k", type=int, default=None, help="NetVLAD clusters (default 32)")
    parser.add_argument("--train-photos", type=int, default=None,
                        help="train/ photos to train on, the same number per class (default 450)")
    parser.add_argument("--copies", type=int, default=3, help="attacked copies per training photo (default 3)")
    parser.add_argument("--near-duplicates", type=int, default=600,
                        help="test/ originals in the near-duplicate benchmark (default 600, as bench_netvlad.py)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        parser.error("needs torch and torchvision (pip install torch==2.14.1 torchvision==0.29.1)")
    return run(args, parser)


def near_duplicates(args, test_paths, y_test, max_side, quick):
    """bench_netvlad.py's ``run_near_duplicates`` construction, the same images and seed."""
    n_classes = len(np.unique(y_test))
    per_class = max(1, (2 if quick else args.near_duplicates) // n_classes)
    chosen = [i for c in range(n_classes) for i in np.flatnonzero(y_test == c)[:per_class]]
    photos = [(str(Path(test_paths[i]).relative_to(Path(args.data))),
               read_image(test_paths[i], mode="rgb", max_side=max_side)) for i in chosen]
    return len(photos), near_duplicate_set(photos, distractors_per_photo=3, learning_per_photo=0, seed=args.seed)


def score(database, queries, data):
    """mAP and recall@1 of exact inner-product search (unit vectors)."""
    database_ids = [name for name, _ in data.database]
    query_ids = [name for name, _, _ in data.queries]
    order = np.argsort(-(queries.astype(np.float32) @ database.astype(np.float32).T), axis=1, kind="stable")
    rankings = {q: [database_ids[j] for j in row] for q, row in zip(query_ids, order)}
    return (mean_average_precision(rankings, data.ground_truth),
            recall_at_k(rankings, data.ground_truth, k=1)[1])


def vlad_row(args, extractor, train_paths, data, k, quick):
    """RootSIFT VLAD K=64 as bench_netvlad.py's baseline: k-means on a 300,000-descriptor
    sample of train/ (DescriptorSampler), VLADEncoder, every descriptor encoded."""
    sampler = DescriptorSampler(len(train_paths), 20_000 if quick else 300_000, seed=args.seed)
    for first in range(0, len(train_paths), 32):
        for offset, features in enumerate(extractor.transform(train_paths[first:first + 32])):
            sampler.add(first + offset, features.descriptors)
    vocabulary = KMeansVocabulary(k, random_state=args.seed).fit_sample(sampler.sample())
    encoder = VLADEncoder(vocabulary=vocabulary).fit([np.zeros((1, 128), np.float32)])

    def encode(images):
        return np.concatenate([encoder.transform(extractor.transform(images[first:first + 32]))
                               for first in range(0, len(images), 32)])

    database = encode([image for _, image in data.database])
    queries = encode([image for _, image, _ in data.queries])
    return database.shape[1], score(database, queries, data)


def run(args, parser):
    import torch

    from vladkit.netvlad import ImageGroupsDataset, build_backbone, init_netvlad_from_images, train_on_images
    from vladkit.netvlad.image_training import embed_dataset

    quick = args.quick
    size = args.image_size or (64 if quick else 96)
    k = args.k or (8 if quick else 32)
    n_train = args.train_photos or (30 if quick else 450)
    copies = min(args.copies, 2) if quick else args.copies
    recipe = dict(QUICK if quick else RECIPE)
    if args.epochs is not None:
        recipe["epochs"] = args.epochs
    if args.lr is not None:
        recipe["lr"] = args.lr
    data_root = Path(args.data)
    train_all, y_train, classes = labelled_images(data_root / "train")
    test_paths, y_test, _ = labelled_images(data_root / "test")
    if not train_all or not test_paths:
        parser.error(f"no images under {data_root}/train and {data_root}/test")
    per_class = max(1, n_train // len(classes))
    train_paths = [train_all[i] for c in range(len(classes)) for i in np.flatnonzero(y_train == c)[:per_class]]
    # Validation (the epoch kept): the next 3 train/ photos of each class, never trained on.
    val_paths = [train_all[i] for c in range(len(classes))
                 for i in np.flatnonzero(y_train == c)[per_class:per_class + (1 if quick else 3)]]
    command = "python benchmarks/bench_netvlad_images.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    started, load_start = time.perf_counter(), os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{command}\n{date}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} torch threads; load average "
          "{:.2f} / {:.2f} / {:.2f}".format(*load_start), flush=True)
    rows, timings = [], []

    def timed(name, function):
        before, start = load(), time.perf_counter()
        value = function()
        seconds = time.perf_counter() - start
        timings.append((name, seconds, before, load()))
        print(f"  {name}: {seconds:.0f} s (load {before:.1f} -> {load():.1f})", flush=True)
        return value, seconds

    extractor = DenseSIFT(root=True, n_jobs=args.threads)
    n_photos, data = near_duplicates(args, test_paths, y_test, extractor.max_side, quick)
    print(f"near duplicates: {n_photos} test/ originals, {len(data.database)} database images, "
          f"{len(data.queries)} queries", flush=True)

    # The CNN's view of the benchmark: the same images at the working size.
    database_set = ImageGroupsDataset([image for _, image in data.database], image_size=size)
    query_set = ImageGroupsDataset([image for _, image, _ in data.queries], image_size=size)
    training, _ = timed(f"training set: {len(train_paths)} train/ photos + {copies} copies each",
                        lambda: ImageGroupsDataset(train_paths, image_size=size, copies=copies, augment=True,
                                                   flip=False, seed=args.seed))

    validation = ImageGroupsDataset(val_paths, image_size=size, copies=copies, seed=args.seed + 1)

    def evaluate(model):
        database = embed_dataset(model, database_set)
        queries = embed_dataset(model, query_set)
        return database.shape[1], score(database, queries, data)

    torch.manual_seed(args.seed)  # the backbone's random weights
    backbone = build_backbone("resnet18", layer="layer3")
    model, _ = timed(f"init: k-means K={k} on backbone descriptors",
                     lambda: init_netvlad_from_images(backbone, training, k, n_images=min(500, len(training)),
                                                      random_state=args.seed, n_threads=args.threads))
    torch.set_num_threads(args.threads)
    name = f"resnet18/layer3 (random weights) + NetVLAD K={k}, {size} px"
    (dim, (mAP, r1)), seconds = timed("evaluation, initialisation", lambda: evaluate(model))
    rows.append((f"{name}: initialisation", dim, mAP, r1, seconds))
    print(f"  initialisation: mAP {mAP:.3f}, recall@1 {r1:.3f}", flush=True)
    (model, history), train_seconds = timed(
        "training", lambda: train_on_images(model, training, **recipe, validation=validation, random_state=args.seed,
                                            n_threads=args.threads, log=lambda line: print("    " + line, flush=True)))
    (dim, (mAP, r1)), seconds = timed("evaluation, trained", lambda: evaluate(model))
    kept = max(history, key=lambda h: (h["validation_map"], h["epoch"]))["epoch"]
    rows.append((f"{name}: trained on attacked copies (epoch {kept} kept)", dim, mAP, r1, seconds))
    print(f"  trained: mAP {mAP:.3f}, recall@1 {r1:.3f}", flush=True)
    vk = 16 if quick else 64
    (dim, (mAP, r1)), seconds = timed(f"RootSIFT VLAD K={vk} (vocabulary, extraction, encoding)",
                                      lambda: vlad_row(args, extractor, train_all if not quick else train_paths,
                                                       data, vk, quick))
    rows.append((f"RootSIFT VLAD K={vk} (dense, bench_netvlad.py's)", dim, mAP, r1, seconds))
    print(f"  RootSIFT VLAD: mAP {mAP:.3f}, recall@1 {r1:.3f}", flush=True)
    total = time.perf_counter() - started
    write(args, command, date, load_start, os.getloadavg(), rows, timings, history, recipe, total, size, k,
          len(train_paths), copies, len(training), n_photos, data, torch.__version__, len(val_paths))
    return 0


def write(args, command, date, load_start, load_end, rows, timings, history, recipe, total, size, k, n_train,
          copies, n_items, n_photos, data, torch_version, n_val):
    lines = [
        f"Training on images, end to end: a CNN with random weights trained through NetVLAD on attacked "
        f"copies of 15-Scene `train/`, evaluated on bench_netvlad.py's held-out near duplicates from `test/`.",
        "",
        f"`{command}`; {date}; {os.cpu_count()} cores (shared), torch {torch_version}, {args.threads} torch "
        f"threads, seed {args.seed}; load average {load_start[0]:.2f} / {load_start[1]:.2f} / "
        f"{load_start[2]:.2f} at the start, {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} at the "
        f"end; total {total / 60:.1f} min.",
        "",
        f"Training: {n_train} `train/` photos ({n_train // 15} per class) and {copies} attacked copies each "
        f"({n_items} items, {n_items // (copies + 1)} groups), {size} x {size} px, random resized crops "
        f"(50-100% of the area), brightness/contrast ±20%, no flips (the distractors are mirrored crops); `train_on_images` recipe `{recipe}` "
        f"(cache refreshed at the start of every epoch); validation: {n_val} other `train/` photos with "
        f"{copies} copies each, the epoch of the best validation mAP kept (0: the initialisation).",
        "",
        f"### Near-duplicate retrieval ({n_photos} test/ originals + {len(data.database) - n_photos} "
        f"distractors, {len(data.queries)} attacked queries; exact search)",
        "",
        "| encoding | dim | mAP | recall@1 | time |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {dim:,} | {mAP:.3f} | {r1:.3f} | {seconds:.0f} s |" for name, dim, mAP, r1, seconds in rows]
    lines += ["", "Times: the encoding of the benchmark's images for the CNN rows (the training is below); "
              "for VLAD, vocabulary (DenseSIFT over `train/`, k-means) plus extraction and encoding.", "",
              "### Training per epoch", "", "| epoch | mean triplet loss | validation mAP |", "|---|---|---|"]
    lines += [f"| {h['epoch']} | {'' if h['loss'] is None else format(h['loss'], '.4f')} | "
              f"{h['validation_map']:.3f} |" for h in history]
    lines += ["", "### Timings", "", "| step | wall time | load average before / after |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.0f} s | {before:.1f} / {after:.1f} |" for name, seconds, before, after in timings]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("netvlad_images" + ("-quick" if args.quick else "") + ".md")).write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
