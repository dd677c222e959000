"""What the long-side downscale ``max_side`` costs and saves: accuracy, time, memory.

    cd benchmarks && python bench_max_side.py [--data ../shared/data/scene15] [--quick]
        [--full-res] [--tables 123] [--photos /tmp/vladkit-phone-photos]
        [--out results/max_side.md]

Every extractor is given ``max_side`` explicitly (None = the image as stored). Prints
three markdown tables and writes them to --out (rewritten after each table):

1. 15-Scene (200 x 200 images) classification against ``max_side`` 96 / 128 / 160 / None:
   ``ImageEncoder(DenseSIFT(root=True, max_side=m, n_jobs=-1), FisherEncoder(64))`` fitted
   on ``train/``, then bench_scene15.py's protocol (precomputed linear kernel, SVC, C by
   5-fold cross-validation, balanced accuracy on ``test/``); the None row is the README's
   untuned ``FisherEncoder(64)`` figure. Gives descriptors per image, seconds to fit and
   encode, seconds in all: a few minutes per row on 2 cores.
2. One synthetic 12-megapixel phone photo (phone_photos.py: 4032 x 3024 JPEG, quality 92,
   a mosaic of upscaled 15-Scene images with sensor-like noise, written once to --photos)
   against ``max_side`` 480 / 640 / 800 / 1024 / 1600 / None: seconds to read it, and
   seconds, descriptors and peak resident memory of ``DenseSIFT(root=True)`` and
   ``SIFT(root=True)`` with ``n_jobs=1`` (OpenCV's SIFT and the dense SIFT kernels still
   use several threads inside one image). Each extractor and size runs in a fresh process
   (so its peak memory is its own; the table also gives a bare process's): one warm-up
   run (numba loads its compiled kernels), then the median of 3 runs, reading the file
   each time. DenseSIFT at full size (3 million descriptors, 1.5 GB as float32) runs only
   with --full-res: before dense SIFT was computed in bands, it needed more than 12 GB.
3. The built-in near-duplicate benchmark of ``vladkit demo`` (sample photos of at most
   512 pixels; vladkit.datasets.near_duplicate_set, seed 0) with ``SIFT(root=True,
   max_side=m)`` for every image (learning, database, queries), m = 256 / 384 / None:
   mAP and recall@1 of VLAD K=64 and FV K=64 PCA-64, vocabularies as the demo fits them,
   exact search. The None row is ``vladkit demo``'s own VLAD and FV rows.

``--quick`` is a smoke run of a minute or two: 3 images per class and K=8 for table 1, a
1008 x 756 photo (DenseSIFT at full size included) for table 2, 6 photos and K=8 for
table 3.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2
import numpy as np
from bench_scene15 import choose_c_and_score
from phone_photos import DEFAULT_DATA, write_phone_photos

from vladkit import (
    SIFT,
    DenseSIFT,
    DescriptorSampler,
    FisherEncoder,
    GMMVocabulary,
    ImageEncoder,
    KMeansVocabulary,
    VectorIndex,
    VLADEncoder,
    labelled_images,
    mean_average_precision,
    read_image,
    recall_at_k,
)
from vladkit.datasets.near_duplicates import demo_photos, near_duplicate_set
from vladkit.app.demo import SAMPLE

SCENE_SIDES = (96, 128, 160, None)
PHOTO_SIDES = (480, 640, 800, 1024, 1600, None)
DEMO_SIDES = (256, 384, None)
RUNS = 3  # timed runs per extractor and size in table 2, after one warm-up run


def side_name(max_side):
    return "None" if max_side is None else str(max_side)


def markdown(header, rows):
    """A markdown table: a header tuple and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ------------------------------------------------------------------ 1. 15-Scene accuracy


def scene15_table(data, k, per_class):
    """Balanced accuracy of the Fisher vector of dense RootSIFT against ``max_side``.

    Parameters
    ----------
    data : path
        15-Scene folder with ``train/`` and ``test/``.
    k : int
        Gaussians of the Fisher vector.
    per_class : int or None
        Images per class (None: all).

    Returns
    -------
    str
        The section: a caption and the table.
    """
    train, y_train, _ = labelled_images(Path(data) / "train", per_class)
    test, y_test, _ = labelled_images(Path(data) / "test", per_class)
    print(f"15-Scene: {len(train)} train / {len(test)} test images")
    rows = []
    for max_side in SCENE_SIDES:
        probe = DenseSIFT(root=True, max_side=max_side).transform([train[0]])[0]
        start = time.perf_counter()
        model = ImageEncoder(DenseSIFT(root=True, max_side=max_side, n_jobs=-1),
                             FisherEncoder(k, random_state=0), random_state=0).fit(train)
        X_train, X_test = model.transform(train), model.transform(test)
        encoding = time.perf_counter() - start
        accuracy, C, _ = choose_c_and_score(X_train @ X_train.T, y_train, X_test @ X_train.T, y_test)
        total = time.perf_counter() - start
        height, width = probe.image_shape
        rows.append((side_name(max_side), f"{width} x {height}", f"{len(probe):,}", f"{100 * accuracy:.1f}%",
                     f"{C:g}", f"{encoding:.0f}", f"{total:.0f}"))
        print(f"  max_side={side_name(max_side)}: {100 * accuracy:.1f}% (C={C:g}), {total:.0f} s")
    caption = (f"### 15-Scene classification against max_side\n\n{len(train)} train / {len(test)} test "
               f"images (200 x 200), `ImageEncoder(DenseSIFT(root=True, max_side=m, n_jobs=-1), "
               f"FisherEncoder({k}, random_state=0), random_state=0)`, linear SVM on the precomputed "
               "kernel, C by 5-fold cross-validation, balanced accuracy on test/. Seconds: fit + "
               "encode both splits, and in all (with the classifier).")
    header = ("max_side", "image as read", "descriptors / image", "balanced accuracy", "C",
              "fit + encode s", "total s")
    return f"{caption}\n\n{markdown(header, rows)}"


# ------------------------------------------------------- 2. time and memory per photo


def peak_rss_mb():
    """This process's peak resident memory in MB: Linux's VmHWM, which unlike
    ``ru_maxrss`` does not carry over the parent's memory from before the process's exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def timed_extraction(extractor, path, runs):
    """One warm-up run, then ``runs`` timed runs of ``extractor.transform([path])``.

    Returns
    -------
    seconds : float
        Median of the timed runs.
    n_descriptors : int
    peak_mb : float
        Peak resident memory of the calling process.
    """
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        features = extractor.transform([path])[0]
        times.append(time.perf_counter() - start)
        n_descriptors = len(features)
        del features  # not alive during the next run: one image's features at a time
    return statistics.median(times[1:]), n_descriptors, peak_rss_mb()


def in_fresh_process(function, *args):
    """``function(*args)`` in a new Python process (None if that process dies, e.g. of
    running out of memory)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            return None


def read_seconds(path, max_side, runs):
    """Median seconds of ``read_image(path, max_side=max_side)`` and the image's shape."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        shape = read_image(path, max_side=max_side).shape
        times.append(time.perf_counter() - start)
    return statistics.median(times), shape


def photo_table(folder, width, height, full_res):
    """Seconds, descriptors and peak memory per phone photo against ``max_side``.

    Parameters
    ----------
    folder : path
        Where the photo is written (kept for the next run).
    width, height : int
        Photo size.
    full_res : bool
        Also run DenseSIFT without downscaling.

    Returns
    -------
    str
        The section: a caption and the table.
    """
    path = write_phone_photos(folder, 1, seed=0, width=width, height=height)[0]
    baseline = in_fresh_process(peak_rss_mb)
    print(f"phone photo {path} ({os.path.getsize(path) / 1e6:.1f} MB); a bare process: {baseline:.0f} MB")
    rows = []
    for max_side in PHOTO_SIDES:
        seconds, (h, w) = read_seconds(path, max_side, RUNS)
        row = [side_name(max_side), f"{w} x {h}", f"{seconds:.3f}"]
        for extractor in (DenseSIFT(root=True, max_side=max_side), SIFT(root=True, max_side=max_side)):
            if isinstance(extractor, DenseSIFT) and max_side is None and not full_res:
                row += ["(--full-res)"] * 3
                continue
            result = in_fresh_process(timed_extraction, extractor, path, RUNS)
            if result is None:
                row += ["process died"] * 3
                continue
            seconds, n_descriptors, peak_mb = result
            row += [f"{seconds:.2f}", f"{n_descriptors:,}", f"{peak_mb:,.0f}"]
            print(f"  max_side={side_name(max_side)} {type(extractor).__name__}: {seconds:.2f} s, "
                  f"{n_descriptors:,} descriptors, {peak_mb:,.0f} MB")
        rows.append(row)
    caption = (f"### One {width} x {height} phone photo against max_side\n\n"
               f"`{path.name}` ({os.path.getsize(path) / 1e6:.1f} MB, benchmarks/phone_photos.py, seed 0). "
               f"`n_jobs=1`, median of {RUNS} runs after a warm-up, the file read each time; each "
               f"extractor and size in a fresh process, whose peak resident memory is given (a bare "
               f"process with the imports: {baseline:.0f} MB). \"read s\": `read_image` alone.")
    header = ("max_side", "image as read", "read s", "DenseSIFT s", "DenseSIFT descriptors",
              "DenseSIFT peak MB", "SIFT s", "SIFT descriptors", "SIFT peak MB")
    return f"{caption}\n\n{markdown(header, rows)}"


# ------------------------------------------------------- 3. near-duplicate retrieval


def retrieval_table(n_photos, k, learning_per_photo, seed=0):
    """mAP and recall@1 on the demo's near-duplicate benchmark against SIFT's ``max_side``.

    Parameters
    ----------
    n_photos : int or None
        Use the first photos only (None: all, as the demo).
    k : int
        Centroids / Gaussians of VLAD and the Fisher vector.
    learning_per_photo : int
        Learning images cut from each photo (the demo: 32).
    seed : int
        Seeds the benchmark's attacks and the vocabularies, as the demo's seed.

    Returns
    -------
    str
        The section: a caption and the table.
    """
    photos = demo_photos()[:n_photos]
    data = near_duplicate_set(photos, learning_per_photo=learning_per_photo, seed=seed)
    database_ids = [name for name, _ in data.database]
    query_ids = [name for name, _, _ in data.queries]
    encodings = (
        (f"VLAD K={k}", lambda: KMeansVocabulary(k, max_iter=50, max_descriptors=SAMPLE, random_state=seed),
         VLADEncoder),
        (f"FV K={k} PCA-64", lambda: GMMVocabulary(k, pca=64, max_iter=50, max_descriptors=SAMPLE,
                                                    random_state=seed),
         FisherEncoder),
    )
    rows = []
    for max_side in DEMO_SIDES:
        extractor = SIFT(root=True, max_side=max_side, n_jobs=-1)
        start = time.perf_counter()
        learning = extractor.transform(data.learning)
        database = extractor.transform([image for _, image in data.database])
        queries = extractor.transform([image for _, image, _ in data.queries])
        extraction = time.perf_counter() - start
        sampler = DescriptorSampler(len(learning), SAMPLE, seed=seed)
        for i, features in enumerate(learning):
            sampler.add(i, features.descriptors)
        sample = sampler.sample()
        per_image = np.mean([len(f) for f in database + queries])
        row = [side_name(max_side), f"{per_image:.0f}", f"{extraction:.1f}"]
        for name, make_vocabulary, make_encoder in encodings:
            encoder = make_encoder(vocabulary=make_vocabulary().fit_sample(sample)).fit(learning[:1])
            index = VectorIndex("flat")
            index.add(encoder.transform(database), database_ids)
            _, ranked = index.search(encoder.transform(queries), k=len(index))
            rankings = dict(zip(query_ids, ranked))
            average = mean_average_precision(rankings, data.ground_truth)
            recall = recall_at_k(rankings, data.ground_truth, k=1)[1]
            row += [f"{average:.3f}", f"{recall:.3f}"]
            print(f"  max_side={side_name(max_side)} {name}: {average:.3f} mAP, {recall:.3f} recall@1")
        rows.append(row)
    long_side = max(max(image.shape[:2]) for _, image in photos)
    caption = (f"### Near-duplicate retrieval (the `vladkit demo` benchmark) against SIFT's max_side\n\n"
               f"{len(data.database)} database images, {len(data.queries)} queries, "
               f"{len(data.learning)} learning images, from {len(photos)} photos of at most "
               f"{long_side} pixels; `SIFT(root=True, max_side=m)` for all of them, vocabularies as "
               "the demo fits them, exact search. Descriptors per image: database and queries.")
    header = ("SIFT max_side", "descriptors / image", "extraction s", *(
        f"{name} {measure}" for name, _, _ in encodings for measure in ("mAP", "recall@1")))
    return f"{caption}\n\n{markdown(header, rows)}"


# ------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, small K, a small photo")
    parser.add_argument("--full-res", action="store_true",
                        help="table 2: also DenseSIFT on the full 12 MP photo (3 million descriptors)")
    parser.add_argument("--tables", default="123", help="which tables to run, e.g. 23 (default 123)")
    parser.add_argument("--photos", default="/tmp/vladkit-phone-photos",
                        help="folder for the generated phone photo (kept between runs)")
    parser.add_argument("--out", help="markdown file for the tables (default benchmarks/results/max_side.md, "
                                      "max_side_quick.md with --quick)")
    args = parser.parse_args(argv)
    if not set(args.tables) <= set("123"):
        parser.error(f"--tables takes digits 1, 2 and 3, got {args.tables!r}")
    k = 8 if args.quick else 64
    tables = {
        "1": lambda: scene15_table(args.data, k, 3 if args.quick else None),
        "2": lambda: photo_table(args.photos, *((1008, 756) if args.quick else (4032, 3024)),
                                 args.full_res or args.quick),
        "3": lambda: retrieval_table(6 if args.quick else None, k, 8 if args.quick else 32),
    }
    results = Path(__file__).resolve().parent / "results"
    out = Path(args.out or results / ("max_side_quick.md" if args.quick else "max_side.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [f"## max_side benchmark{' (--quick)' if args.quick else ''}\n\n"
                f"`{' '.join(['python bench_max_side.py', *(sys.argv[1:] if argv is None else argv)])}`"
                f", vladkit {vladkit.__version__}, OpenCV {cv2.__version__}, {os.cpu_count()} cores."]
    start = time.perf_counter()
    for table in sorted(set(args.tables)):
        table_start = time.perf_counter()
        section = tables[table]()
        # The machine may be shared: the load says whether the seconds are this run's alone.
        sections.append(f"{section}\n\n{time.perf_counter() - table_start:.0f} s wall; 1-minute load "
                        f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
        print(f"\n{sections[-1]}\n", flush=True)
        out.write_text("\n\n".join(sections) + "\n")
    print(f"wall time {time.perf_counter() - start:.0f} s; tables written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
