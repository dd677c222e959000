"""Comparing the encodings on real photos: 15-Scene, the standard protocol.

    python benchmarks/bench_scene15.py [--data ../shared/data/scene15] [--quick] [--out DIR]

Train on ``train/`` (100 images per class), report balanced accuracy (mean per-class
recall) on ``test/``. Every encoding uses dense RootSIFT (step 4, bin sizes 4/6/8/10,
PHOW smoothing) and is run with and without a spatial pyramid (1x1 + 2x2 + 1x3):

* BoF, K = 1000, Hellinger (signed square root, L2)
* VLAD, K = 64 and 256, signed square root + intra + L2
* Fisher vector, K = 64 on PCA-64 and K = 256 on PCA-80 descriptors, improved

Memory stays bounded (see DESIGN.md, "Memory model"): one pass over the training images
samples descriptors for the vocabularies; a second pass extracts each image once and
encodes it with every variant. Training vectors are kept (float16) to form the linear
kernel matrix; test vectors are turned into kernel rows batch by batch and dropped. The
classifier is a linear SVM on that precomputed kernel (scikit-learn's SVC, one-vs-one),
C chosen by 5-fold cross-validation on the training set. A pyramid's 1x1 cell is the
whole-image encoding, so the plain variant is read off the pyramid's first block.

Writes ``scene15.md`` (table) and ``scene15.png`` (plot, needs matplotlib: the ``bench``
extra) into --out. ``--quick`` (a few images per class, small vocabularies) is a smoke
test of a few minutes.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from vladkit import (
    BoFEncoder,
    DenseSIFT,
    DescriptorSampler,
    FisherEncoder,
    GMMVocabulary,
    KMeansVocabulary,
    SpatialPyramid,
    VLADEncoder,
    list_images,
)
from vladkit.normalize import l2_normalize

LEVELS = ((1, 1), (2, 2), (1, 3))
C_GRID = (0.1, 1.0, 10.0, 100.0)


def labelled_images(folder, per_class=None):
    classes = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        images = list_images(Path(folder) / name)[:per_class]
        paths += images
        labels += [label] * len(images)
    return paths, np.array(labels), classes


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variants(quick):
    """(name, vocabulary factory, encoder factory) for each encoding."""
    k_bof, k_small, k_large = (100, 8, 16) if quick else (1000, 64, 256)
    pca_small, pca_large = (32, 32) if quick else (64, 80)
    return [
        (f"BoF K={k_bof} Hellinger", lambda s: KMeansVocabulary(k_bof, random_state=s),
         lambda v: BoFEncoder(vocabulary=v, power=0.5, norm="l2")),
        (f"VLAD K={k_small}", lambda s: KMeansVocabulary(k_small, random_state=s),
         lambda v: VLADEncoder(vocabulary=v)),
        (f"VLAD K={k_large}", lambda s: KMeansVocabulary(k_large, random_state=s),
         lambda v: VLADEncoder(vocabulary=v)),
        (f"FV K={k_small} PCA-{pca_small}", lambda s: GMMVocabulary(k_small, pca=pca_small, random_state=s),
         lambda v: FisherEncoder(vocabulary=v)),
        (f"FV K={k_large} PCA-{pca_large}", lambda s: GMMVocabulary(k_large, pca=pca_large, random_state=s),
         lambda v: FisherEncoder(vocabulary=v)),
    ]


def gram(A, B, block=256):
    """A @ B.T in float32, from blocks of rows of both (float16 storage is never
    converted whole: 1,498 x 327,680 float32 would be 2 GB)."""
    out = np.empty((len(A), len(B)), dtype=np.float32)
    for i in range(0, len(A), block):
        rows = A[i:i + block].astype(np.float32)
        for j in range(0, len(B), block):
            out[i:i + block, j:j + block] = rows @ B[j:j + block].astype(np.float32).T
    return out


def choose_c_and_score(K_train, y_train, K_test, y_test, seed=0):
    folds = StratifiedKFold(min(5, np.bincount(y_train).min()), shuffle=True, random_state=seed)
    scores = {}
    for C in C_GRID:
        fold_scores = []
        for fit_rows, val_rows in folds.split(K_train, y_train):
            model = SVC(C=C, kernel="precomputed").fit(K_train[np.ix_(fit_rows, fit_rows)], y_train[fit_rows])
            predicted = model.predict(K_train[np.ix_(val_rows, fit_rows)])
            fold_scores.append(balanced_accuracy_score(y_train[val_rows], predicted))
        scores[C] = np.mean(fold_scores)
    best = max(C_GRID, key=lambda C: scores[C])
    start = time.perf_counter()
    model = SVC(C=best, kernel="precomputed").fit(K_train, y_train)
    seconds = time.perf_counter() - start
    return balanced_accuracy_score(y_test, model.predict(K_test)), best, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few images per class, small K")
    parser.add_argument("--per-class", type=int, default=4, help="images per class with --quick (default 4)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for scene15.md / .png")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    per_class = args.per_class if args.quick else None
    train_paths, y_train, classes = labelled_images(Path(args.data) / "train", per_class)
    test_paths, y_test, _ = labelled_images(Path(args.data) / "test", per_class)
    if not train_paths or not test_paths:
        parser.error(f"no images under {args.data}/train and {args.data}/test")
    print(f"15-Scene: {len(train_paths)} train / {len(test_paths)} test images, {len(classes)} classes")
    extractor = DenseSIFT(root=True, n_jobs=-1)
    timing = {"extraction": 0.0}

    # Pass 1: a bounded descriptor sample from the training images, for the vocabularies.
    start = time.perf_counter()
    sampler = DescriptorSampler(len(train_paths), 20_000 if args.quick else 300_000, seed=args.seed)
    for first in range(0, len(train_paths), args.batch_size):
        for offset, features in enumerate(extractor.transform(train_paths[first:first + args.batch_size])):
            sampler.add(first + offset, features.descriptors)
    sample = sampler.sample()
    timing["extraction"] += time.perf_counter() - start
    print(f"pass 1: {len(sample):,} descriptors sampled in {timing['extraction']:.0f} s")

    encoders, rows = [], {}
    for name, make_vocabulary, make_encoder in variants(args.quick):
        start = time.perf_counter()
        vocabulary = make_vocabulary(args.seed).fit_sample(sample)
        pyramid = SpatialPyramid(make_encoder(vocabulary), levels=LEVELS).fit([sample[:10]])
        rows[name] = {"vocabulary s": time.perf_counter() - start, "encoding s": 0.0}
        encoders.append((name, pyramid))
        print(f"  {name}: vocabulary in {rows[name]['vocabulary s']:.0f} s")
    del sample, sampler

    # Pass 2: extract each image once, encode with every variant (pyramid; plain = 1x1 cell).
    train_vectors = {}
    test_kernels = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        for first in range(0, len(paths), args.batch_size):
            start = time.perf_counter()
            features = extractor.transform(paths[first:first + args.batch_size])
            timing["extraction"] += time.perf_counter() - start
            for name, pyramid in encoders:
                start = time.perf_counter()
                spm = pyramid.transform(features)
                block = pyramid.encoder_.n_features_out_
                plain = l2_normalize(spm[:, :block].copy())  # the 1x1 cell, re-normalised
                rows[name]["encoding s"] += time.perf_counter() - start
                for variant, vectors in ((name, plain), (name + " + SPM", spm)):
                    if split == "train":  # preallocated: no list of batches to concatenate
                        if variant not in train_vectors:
                            train_vectors[variant] = np.empty((len(paths), vectors.shape[1]), np.float16)
                        train_vectors[variant][first:first + len(vectors)] = vectors
                    else:
                        test_kernels.setdefault(variant, []).append(gram(vectors, train_vectors[variant]))
            done = first + len(features)
            print(f"  pass 2, {split}: {done}/{len(paths)} images, peak memory {peak_memory_mb():,.0f} MB",
                  end="\r", flush=True)
        print()

    results = []
    for name, _ in encoders:
        for variant in (name, name + " + SPM"):
            X_train = train_vectors.pop(variant)
            start = time.perf_counter()
            K_train = gram(X_train, X_train)
            K_test = np.concatenate(test_kernels.pop(variant))
            accuracy, C, fit_seconds = choose_c_and_score(K_train, y_train, K_test, y_test, args.seed)
            training = time.perf_counter() - start
            results.append((variant, X_train.shape[1], accuracy, C, rows[name], training))
            print(f"  {variant}: dim {X_train.shape[1]:,}, balanced accuracy {100 * accuracy:.1f}% (C={C})")
            del X_train, K_train, K_test

    peak = peak_memory_mb()
    lines = [
        f"15-Scene, {len(train_paths)} train / {len(test_paths)} test images, dense RootSIFT "
        f"(step 4, sizes 4/6/8/10); extraction {timing['extraction']:.0f} s for all encodings "
        f"together; peak resident memory {peak:,.0f} MB.",
        "",
        "| encoding | dim | balanced accuracy | C | vocabulary s | encoding s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, dim, accuracy, C, timings, training in results:
        share = "(shared with the pyramid)" if "SPM" not in variant else f"{timings['encoding s']:.0f}"
        lines.append(f"| {variant} | {dim:,} | {100 * accuracy:.1f}% | {C:g} | "
                     f"{timings['vocabulary s']:.0f} | {share} | {training:.0f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scene15.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no plot")
    else:
        figure, axis = plt.subplots(figsize=(8, 4))
        names = [r[0] for r in results]
        axis.barh(names, [100 * r[2] for r in results], color=["#4c72b0" if "SPM" not in n else "#dd8452" for n in names])
        axis.set_xlabel("balanced accuracy on 15-Scene test (%)")
        axis.set_xlim(50, 100)
        axis.invert_yaxis()
        for y, r in enumerate(results):
            axis.text(100 * r[2] + 0.3, y, f"{100 * r[2]:.1f}", va="center", fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "scene15.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
