"""Comparing the encodings on real photos: 15-Scene, the standard protocol.

    python benchmarks/bench_scene15.py [--data ../shared/data/scene15] [--quick] [--out DIR]

Train on ``train/`` (100 images per class), report balanced accuracy (mean per-class
recall) on ``test/``. Every encoding uses dense RootSIFT (step 4, bin sizes 4/6/8/10,
PHOW smoothing) and is run with and without a spatial pyramid (1x1 + 2x2 + 1x3):

* BoF, K = 1000, Hellinger (signed square root, L2)
* VLAD, K = 64 and 256, signed square root + intra + L2
* Fisher vector, K = 64 on PCA-64 and K = 256 on PCA-80 descriptors, improved

"FV K=64 no PCA" fits the GMM on the 128-D descriptors themselves: the reason
``FisherEncoder``'s default ``pca="auto"`` reduces them to 64 first (the "FV K=64 PCA-64"
row is what ``FisherEncoder(64)`` does untuned).

Memory stays bounded whatever the number of images (see ARCHITECTURE.md, "Memory model"): one
pass over the training images samples descriptors for the vocabularies; a second pass
extracts each image once and encodes it with every variant, appending the vectors batch by
batch to float16 files in a scratch folder (``--scratch``, default a temporary folder,
~7 GB for the full run, deleted at the end). The linear kernel matrices are then formed
from row blocks read back from those files. The classifier is a linear SVM on the
precomputed kernel (scikit-learn's SVC, one-vs-one), C chosen by 5-fold cross-validation
on the training set. A pyramid's 1x1 cell is the whole-image encoding, so only pyramids are
stored and the plain variant is read off their first block (re-normalised).

Writes ``scene15.md`` (table) and ``scene15.png`` (plot, needs matplotlib: the ``bench``
extra) into --out. ``--quick`` (a few images per class, small vocabularies) is a smoke
test of a few minutes.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import resource
import sys
import tempfile
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
    labelled_images,
)
from vladkit.normalize import l2_normalize

LEVELS = ((1, 1), (2, 2), (1, 3))
C_GRID = (0.1, 1.0, 10.0, 100.0)


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
        (f"FV K={k_small} no PCA", lambda s: GMMVocabulary(k_small, random_state=s),
         lambda v: FisherEncoder(vocabulary=v)),
    ]


class RowFile:
    """Vectors appended batch by batch to a float16 file, read back in blocks of rows.

    Reads are explicit (not a memory map, whose resident pages would count as the
    process's memory), so holding 1,498 x 327,680 training vectors costs no RAM.
    """

    def __init__(self, path, dim):
        self.path, self.dim, self.n_rows = Path(path), dim, 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (appended to across batches)

    def append(self, vectors):
        self._file.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
        self.n_rows += len(vectors)

    def blocks(self, rows, columns=None):
        """Yield (first row, float32 block); ``columns`` keeps the first columns only,
        each row re-normalised (a pyramid's 1x1 cell)."""
        self._file.flush()
        row_bytes = self.dim * 2
        with open(self.path, "rb") as file:
            for first in range(0, self.n_rows, rows):
                count = min(rows, self.n_rows - first) * self.dim
                file.seek(first * row_bytes)
                block = np.fromfile(file, dtype=np.float16, count=count).reshape(-1, self.dim)
                if columns is not None:
                    yield first, l2_normalize(block[:, :columns].astype(np.float32))
                else:
                    yield first, block.astype(np.float32)

    def close(self):
        self._file.close()


def gram(A, B, columns=None, rows=256):
    """A @ B.T (float32) for two RowFiles, one pair of row blocks at a time."""
    out = np.empty((A.n_rows, B.n_rows), dtype=np.float32)
    for i, a in A.blocks(rows, columns):
        for j, b in B.blocks(rows, columns):
            out[i:i + len(a), j:j + len(b)] = a @ b.T
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
    parser.add_argument("--scratch", help="folder for the vectors on disk (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scene15-", dir=args.scratch) as scratch:
        return run(args, parser, Path(scratch))


def run(args, parser, scratch):
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

    # Pass 2: extract each image once, encode with every variant's pyramid, append to disk.
    stored = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        for first in range(0, len(paths), args.batch_size):
            start = time.perf_counter()
            features = extractor.transform(paths[first:first + args.batch_size])
            timing["extraction"] += time.perf_counter() - start
            for name, pyramid in encoders:
                start = time.perf_counter()
                spm = pyramid.transform(features)
                rows[name]["encoding s"] += time.perf_counter() - start
                key = (name, split)
                if key not in stored:
                    stored[key] = RowFile(scratch / f"{len(stored)}.f16", spm.shape[1])
                stored[key].append(spm)
            done = first + len(features)
            print(f"  pass 2, {split}: {done}/{len(paths)} images, peak memory {peak_memory_mb():,.0f} MB",
                  end="\r", flush=True)
        print()

    results = []
    for name, pyramid in encoders:
        train, test = stored.pop((name, "train")), stored.pop((name, "test"))
        block = pyramid.encoder_.n_features_out_
        for variant, columns in ((name, block), (name + " + SPM", None)):
            start = time.perf_counter()
            K_train = gram(train, train, columns)
            K_test = gram(test, train, columns)
            accuracy, C, _ = choose_c_and_score(K_train, y_train, K_test, y_test, args.seed)
            training = time.perf_counter() - start
            dim = columns or train.dim
            results.append((variant, dim, accuracy, C, rows[name], training))
            print(f"  {variant}: dim {dim:,}, balanced accuracy {100 * accuracy:.1f}% (C={C})")
            del K_train, K_test
        train.close()
        test.close()

    peak = peak_memory_mb()
    lines = [
        (f"15-Scene, {len(train_paths)} train / {len(test_paths)} test images, dense RootSIFT "
         f"(step 4, sizes 4/6/8/10); extraction {timing['extraction']:.0f} s for all encodings "
         f"together; peak resident memory {peak:,.0f} MB."),
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
