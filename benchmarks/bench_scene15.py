"""Comparing the encodings on real photos: 15-Scene, the standard protocol.

    python benchmarks/bench_scene15.py [--data ../shared/data/scene15] [--quick] [--out DIR] [--cache DIR]
                                       [--splits N]

Train on ``train/`` (100 images per class), report balanced accuracy (mean per-class
recall) on ``test/``. Every encoding uses dense RootSIFT (step 4, bin sizes 4/6/8/10,
PHOW smoothing; "+ 3px bins" adds 3-pixel bins) and is run with and without a spatial
pyramid (1x1 + 2x2 + 1x3):

* BoF, K = 1000 and 4000, Hellinger (signed square root, L2)
* kernel codebook ("KCB", van Gemert et al. 2010; ``BoFEncoder(assignment="soft")``), the
  same words, 5 nearest words per descriptor, sigma estimated on the sample, Hellinger
* LLC (Wang et al. 2010), K = 1000 and 4000 (BoF's words), 5 neighbours, max pooling, L2
* VLAD, K = 64 and 256, signed square root + intra + L2; and on spatially augmented
  descriptors ("+ xy", below: the k-means words then cover appearance and position)
* super-vector coding (Zhou et al. 2010), K = 64 and 256 (VLAD's words), s = 0.1, L2
* Fisher vector, K = 64 on PCA-64 and K = 256 on PCA-80 descriptors, improved; and the
  same on spatially augmented descriptors ("+ xy": each descriptor's position
  (x/w - 0.5, y/h - 0.5) appended, kept out of the PCA; Sanchez et al. 2012)
* "FV K=64 PCA-64 + 3px bins": the same Fisher vector on dense SIFT with bin sizes
  3/4/6/8/10, its own descriptor sample and GMM. On these 200 x 200 images the smallest
  patches carry detail the PHOW sizes miss (bin sizes 6-16 scored 1.3 points below 4-16).
* "+ mirror" (the K = 64 Fisher vectors): every image, train and test, is encoded as the
  mean of its encoding and its left-right mirror's, the flip augmentation of Chatfield et
  al. ("Return of the devil in the details", BMVC 2014). With a linear classifier this is
  averaging the scores of the two views, so the SVM's training set keeps its size.

These are the five encodings of Chatfield et al.'s comparison ("The devil is in the
details", BMVC 2011: hard BoF, kernel codebook, LLC, super vector, Fisher), plus VLAD.
``--only PATTERN ...`` runs some of them (e.g. ``--only 'LLC*' 'BoF*'``).

The "FV K=64 PCA-64" row is what ``FisherEncoder(64)`` does untuned. ``--no-pca`` adds
"FV K=64 no PCA", the GMM on the 128-D descriptors themselves: the reason
``FisherEncoder``'s default ``pca="auto"`` reduces them to 64 first (4 points lower).

Memory stays bounded whatever the number of images (see ARCHITECTURE.md, "Memory model"): one
pass over the training images samples descriptors for the vocabularies; a second pass
extracts each image once and encodes it with every variant, appending the vectors batch by
batch to float16 files (~9 GB for the full run: in ``--cache`` if given, else in a
temporary folder under ``--scratch``, deleted at the end). The linear kernel matrices are then formed
from row blocks read back from those files. The classifier is a linear SVM on the
precomputed kernel (scikit-learn's SVC, one-vs-one), C chosen by 5-fold cross-validation
on the training set. A pyramid's 1x1 cell is the whole-image encoding, so only pyramids are
stored and the plain variant is read off their first block (re-normalised).

Random splits (``--splits N``): one train/test split is one draw, and on 2,969 test images
two rows 0.5 points apart may swap on another. Lazebnik et al. (2006), whose protocol this
is, report the mean and standard deviation over 10 random splits: each time, per class,
as many training images as ``train/`` has (100) drawn at random from ``train/`` and
``test/`` together, the rest for testing. ``--splits N`` adds that column, from the stored
vectors (one more kernel block per row, no re-encoding). The vocabularies and PCA stay
those fitted on ``train/`` images, some of which a random split tests on: the classifier
never sees a test label, but the unsupervised vocabulary has seen some test descriptors.

The full run takes about three hours on 2 cores. ``--cache DIR`` keeps the
vocabularies, the vectors and the results in DIR (~9 GB) and resumes from them: a run
that stops (or is stopped) continues at the first image it lacks, and a rerun with more
rows (``--only``, ``--no-pca``) encodes only those. The table's extraction seconds and
peak memory then cover every run that filled the cache.

Writes ``scene15.md`` (table, rewritten after every row) and ``scene15.png`` (plot, needs
matplotlib: the ``bench`` extra) into --out. ``--quick`` (a few images per class, small vocabularies) is a smoke
test of a few minutes.
"""

from __future__ import annotations

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import fnmatch
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from sklearn.base import clone
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
    LLCEncoder,
    SpatialPyramid,
    SuperVectorEncoder,
    VLADEncoder,
    labelled_images,
    load_vocabulary,
)
from vladkit.features.images import read_image
from vladkit.features.spatial_augmentation import N_POSITION_DIMS, augment_positions
from vladkit.encoders.normalize import l2_normalize

LEVELS = ((1, 1), (2, 2), (1, 3))
#: Super-vector coding's constant s (Zhou et al. leave it free): 0.1, so that on unit-norm
#: RootSIFT the constant terms and the mean offsets (~0.1 long at K=64) weigh alike; with
#: s=1 the constant terms (a square-rooted BoF) would hold 97-99% of the norm.
SV_S = 0.1
C_GRID = (0.1, 1.0, 10.0, 100.0)


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Dense SIFT bin sizes: VLFeat PHOW's (every row), and with 3-pixel bins added ("+ 3px
#: bins"): on 200 x 200 images the 12-pixel patches of 3-pixel bins still carry detail
#: (an outside run: bin sizes 6-16 scored 1.3 points below 4-16 for FV K=64 + SPM).
SIZES = (4, 6, 8, 10)
FINE_SIZES = (3,) + SIZES

#: Rows also run on mirror-averaged encodings ("<row> + mirror").
MIRRORED = ("FV K={k_small} PCA-{pca_small}", "FV K={k_small} PCA-{pca_small} + xy",
            "FV K={k_small} PCA-{pca_small} + 3px bins")


def variants(quick, no_pca=False):
    """(name, vocabulary key, vocabulary factory, encoder factory, spatial, bin sizes) per encoding.

    Rows with the same vocabulary key share one vocabulary (trained once, its time shown on
    the first): LLC and BoF use the same k-means words, SV and VLAD too, so those rows
    compare the codings and nothing else. ``spatial``: the descriptors get their normalised
    position appended (``augment_positions``) and the vocabulary's PCA leaves it out
    (``passthrough_dims=2``), as Sanchez et al. (2012) do. ``bin sizes``: the dense SIFT
    the row is encoded from (``SIZES`` but for the "+ 3px bins" row).
    """
    k_bof, k_llc, k_small, k_large = (100, 200, 8, 16) if quick else (1000, 4000, 64, 256)
    pca_small, pca_large = (32, 32) if quick else (64, 80)
    xy = N_POSITION_DIMS

    def kmeans(k):
        return lambda seed: KMeansVocabulary(k, random_state=seed)

    def gmm(k, pca=None, passthrough_dims=0):
        return lambda seed: GMMVocabulary(k, pca=pca, passthrough_dims=passthrough_dims, random_state=seed)

    def bof(v):
        return BoFEncoder(vocabulary=v, power=0.5, norm="l2")

    def kcb(v):
        # sigma (None) is estimated on the pass-1 sample, see run().
        return BoFEncoder(vocabulary=v, assignment="soft", power=0.5, norm="l2")

    def llc(v):
        return LLCEncoder(vocabulary=v)

    def vlad(v):
        return VLADEncoder(vocabulary=v)

    def sv(v):
        return SuperVectorEncoder(vocabulary=v, s=SV_S)

    def fv(v):
        return FisherEncoder(vocabulary=v)

    phow = [
        (f"BoF K={k_bof} Hellinger", f"kmeans-{k_bof}", kmeans(k_bof), bof, False),
        (f"KCB K={k_bof} Hellinger", f"kmeans-{k_bof}", kmeans(k_bof), kcb, False),
        (f"LLC K={k_bof}", f"kmeans-{k_bof}", kmeans(k_bof), llc, False),
        (f"LLC K={k_llc}", f"kmeans-{k_llc}", kmeans(k_llc), llc, False),
        (f"BoF K={k_llc} Hellinger", f"kmeans-{k_llc}", kmeans(k_llc), bof, False),
        (f"KCB K={k_llc} Hellinger", f"kmeans-{k_llc}", kmeans(k_llc), kcb, False),
        (f"VLAD K={k_small}", f"kmeans-{k_small}", kmeans(k_small), vlad, False),
        (f"SV K={k_small}", f"kmeans-{k_small}", kmeans(k_small), sv, False),
        (f"VLAD K={k_small} + xy", f"kmeans-{k_small}-xy", kmeans(k_small), vlad, True),
        (f"VLAD K={k_large}", f"kmeans-{k_large}", kmeans(k_large), vlad, False),
        (f"SV K={k_large}", f"kmeans-{k_large}", kmeans(k_large), sv, False),
        (f"VLAD K={k_large} + xy", f"kmeans-{k_large}-xy", kmeans(k_large), vlad, True),
        (f"FV K={k_small} PCA-{pca_small}", f"gmm-{k_small}-{pca_small}", gmm(k_small, pca_small), fv, False),
        (f"FV K={k_small} PCA-{pca_small} + xy", f"gmm-{k_small}-{pca_small}-xy",
         gmm(k_small, pca_small, passthrough_dims=xy), fv, True),
        (f"FV K={k_large} PCA-{pca_large}", f"gmm-{k_large}-{pca_large}", gmm(k_large, pca_large), fv, False),
        (f"FV K={k_large} PCA-{pca_large} + xy", f"gmm-{k_large}-{pca_large}-xy",
         gmm(k_large, pca_large, passthrough_dims=xy), fv, True),
    ] + ([
        (f"FV K={k_small} no PCA", f"gmm-{k_small}", gmm(k_small), fv, False),
    ] if no_pca else [])
    fine = [
        (f"FV K={k_small} PCA-{pca_small} + 3px bins", f"gmm-{k_small}-{pca_small}-3px", gmm(k_small, pca_small),
         fv, False, FINE_SIZES),
    ]
    return [row + (SIZES,) for row in phow] + fine


def mirrored_names(quick):
    """Names of the rows that also get a "+ mirror" row."""
    k_small, pca_small = (8, 32) if quick else (64, 64)
    return {name.format(k_small=k_small, pca_small=pca_small) for name in MIRRORED}


def mirrored(paths):
    """The images flipped left-right (decoded arrays)."""
    return [cv2.flip(read_image(path), 1) for path in paths]


class RowFile:
    """Vectors appended batch by batch to a float16 file, read back in blocks of rows.

    Reads are explicit (not a memory map, whose resident pages would count as the
    process's memory), so holding 1,498 x 327,680 training vectors costs no RAM. A JSON
    sidecar records the rows written and the seconds spent encoding them after every
    append, so a run that stops resumes where it was: rows past the record (a batch cut
    off mid-write) are truncated away on opening.
    """

    def __init__(self, path, dim):
        self.path, self.dim = Path(path), dim
        self._meta = self.path.with_suffix(".json")
        self.n_rows, self.seconds = 0, 0.0
        if self.path.exists() and self._meta.exists():
            meta = json.loads(self._meta.read_text())
            if meta["dim"] == dim:
                self.n_rows, self.seconds = meta["n_rows"], meta["seconds"]
        mode = "r+b" if self.n_rows else "wb"
        self._file = open(self.path, mode)  # noqa: SIM115 (appended to across batches)
        self._file.truncate(self.n_rows * self.dim * 2)
        self._file.seek(0, os.SEEK_END)

    def append(self, vectors, seconds=0.0):
        self._file.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
        self._file.flush()
        self.n_rows += len(vectors)
        self.seconds += seconds
        # Recorded once the rows are written: a stop between the two loses the batch only.
        write_json(self._meta, {"dim": self.dim, "n_rows": self.n_rows, "seconds": self.seconds})

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


def write_json(path, value):
    """Write ``value`` as JSON, atomically (a stopped run never leaves half a file)."""
    partial = Path(str(path) + ".partial")
    partial.write_text(json.dumps(value, indent=1))
    partial.replace(path)


def slug(name):
    """A file name for a row: "FV K=64 PCA-64 + xy" -> "FV_K-64_PCA-64_xy"."""
    return "_".join("".join(c if c.isalnum() or c == "-" else "-" for c in word)
                    for word in name.split() if word != "+")


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


def pooled_kernel(K_train, K_test, K_test_test):
    """The kernel over train/ and test/ images together (train/ first), from its three blocks."""
    n = len(K_train)
    K = np.empty((n + len(K_test),) * 2, dtype=np.float32)
    K[:n, :n], K[n:, :n], K[:n, n:], K[n:, n:] = K_train, K_test, K_test.T, K_test_test
    return K


def random_split(y, n_train, seed, index):
    """Random split ``index``: ``n_train[c]`` training images of each class c drawn from all
    images, the rest for testing (Lazebnik et al. 2006). Returns (train rows, test rows)."""
    rng = np.random.default_rng([seed, index])
    train = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False)
                                    for c, n in enumerate(n_train)]))
    return train, np.setdiff1d(np.arange(len(y)), train)


def score_split(K, y, n_train, seed, index):
    """Balanced accuracy on random split ``index`` of the pooled kernel ``K``, C by CV."""
    train, test = random_split(y, n_train, seed, index)
    return choose_c_and_score(K[np.ix_(train, train)], y[train], K[np.ix_(test, train)], y[test], seed)[0]


def format_splits(accuracies):
    """Mean +- sample standard deviation, in percent (the mean alone for one split)."""
    values = 100 * np.asarray(accuracies)
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few images per class, small K")
    parser.add_argument("--per-class", type=int, default=4, help="images per class with --quick (default 4)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for scene15.md / .png")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="run only the encodings whose names match (shell-style, e.g. 'FV*' 'LLC*')")
    parser.add_argument("--scratch", help="parent of the temporary folder for the vectors (default: the system's)")
    parser.add_argument("--cache", metavar="DIR",
                        help="keep the vocabularies, vectors (~9 GB) and results in DIR, and resume from them: "
                             "a stopped run continues where it was, a rerun with more rows encodes only those")
    parser.add_argument("--splits", type=int, default=0, metavar="N",
                        help="also score every row on N random train/test splits and report their mean and "
                             "standard deviation (see 'Random splits' above; default 0: the given split only)")
    parser.add_argument("--no-pca", action="store_true",
                        help="add the 'FV K=64 no PCA' row (its GMM on 128-D descriptors takes ~10 min)")
    args = parser.parse_args(argv)
    if args.splits < 0:
        parser.error(f"--splits must be 0 or more, got {args.splits}")
    if args.cache:
        return run(args, parser, Path(args.cache))
    with tempfile.TemporaryDirectory(prefix="scene15-", dir=args.scratch) as scratch:
        return run(args, parser, Path(scratch))


def run(args, parser, cache):
    if args.quick and args.per_class < 2:
        parser.error(f"--per-class must be at least 2 (C is chosen by cross-validation), got {args.per_class}")
    per_class = args.per_class if args.quick else None
    train_paths, y_train, classes = labelled_images(Path(args.data) / "train", per_class)
    test_paths, y_test, _ = labelled_images(Path(args.data) / "test", per_class)
    if not train_paths or not test_paths:
        parser.error(f"no images under {args.data}/train and {args.data}/test")
    print(f"15-Scene: {len(train_paths)} train / {len(test_paths)} test images, {len(classes)} classes")

    def wanted(name):
        return not args.only or any(fnmatch.fnmatchcase(name, pattern) for pattern in args.only)

    all_variants = variants(args.quick, args.no_pca)
    # A "+ mirror" row needs its row's encoder: asking for it brings the row along.
    mirror = {v[0] for v in all_variants if v[0] in mirrored_names(args.quick) and wanted(v[0] + " + mirror")}
    chosen = [v for v in all_variants if wanted(v[0]) or v[0] in mirror]
    if not chosen:
        parser.error(f"--only {' '.join(args.only)} matches no encoding: "
                     + ", ".join(v[0] for v in all_variants)
                     + " (and the mirror rows " + ", ".join(sorted(n + " + mirror" for n in mirrored_names(args.quick))) + ")")

    # What the cached files were made from: another data set, split or seed needs another folder.
    cache.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(Path(args.data).resolve()), "quick": args.quick, "per_class": per_class,
                "seed": args.seed, "train": len(train_paths), "test": len(test_paths)}
    settings_path = cache / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        parser.error(f"--cache {cache} holds a run with other settings ({settings_path.read_text().strip()}); "
                     "use another folder")
    write_json(settings_path, settings)
    # One extractor per set of bin sizes the chosen rows use.
    extractors = {sizes: DenseSIFT(sizes=sizes, root=True, n_jobs=-1) for sizes in {v[5] for v in chosen}}
    # Extraction seconds and peak memory of the earlier runs that filled the cache: a
    # resumed run's table reports the whole work, not only its own part.
    timing_path = cache / "timing.json"
    earlier = (json.loads(timing_path.read_text()) if timing_path.exists()
               else {"extraction": 0.0, "peak MB": 0.0, "runs": 0})
    timing = {"extraction": 0.0}

    def totals():
        """Extraction seconds and peak memory over this run and the earlier ones (saved)."""
        worked = timing["extraction"] > 0
        total = {"extraction": earlier["extraction"] + timing["extraction"],
                 "peak MB": max(earlier["peak MB"], peak_memory_mb() if worked else 0.0),
                 "runs": earlier["runs"] + worked}
        if worked:
            write_json(timing_path, total)
        return total

    def vocabulary_path(key):
        return cache / f"vocabulary-{key}.npz"

    def cached(path):  # the vocabulary, and its fitting time written after it
        return path.exists() and path.with_suffix(".json").exists()

    samples = {}

    def sample_of(sizes, spatial):
        """Pass 1, on first need: a bounded descriptor sample from the training images,
        for the vocabularies and the kernel codebook's sigma (not drawn at all when the
        cache holds them). Its rows end with the positions: kept for the spatial rows."""
        if sizes not in samples:
            start = time.perf_counter()
            sampler = DescriptorSampler(len(train_paths), 20_000 if args.quick else 300_000, seed=args.seed)
            for first in range(0, len(train_paths), args.batch_size):
                batch = train_paths[first:first + args.batch_size]
                for offset, features in enumerate(extractors[sizes].transform(batch)):
                    sampler.add(first + offset, augment_positions(features).descriptors)
            samples[sizes] = sampler.sample()
            del sampler
            seconds = time.perf_counter() - start
            timing["extraction"] += seconds
            print(f"pass 1: {len(samples[sizes]):,} descriptors sampled in {seconds:.0f} s "
                  f"(bin sizes {'/'.join(map(str, sizes))})")
        return samples[sizes] if spatial else samples[sizes][:, :-N_POSITION_DIMS]

    encoders, rows, vocabularies, vocabulary_seconds = [], {}, {}, {}
    for name, vocabulary_key, make_vocabulary, make_encoder, spatial, sizes in chosen:
        path = vocabulary_path(vocabulary_key)
        shared = vocabulary_key in vocabularies
        source = "vocabulary shared"
        if not shared:
            if cached(path):
                vocabularies[vocabulary_key] = load_vocabulary(path)
                seconds = json.loads(path.with_suffix(".json").read_text())["seconds"]
                source = f"vocabulary in {seconds:.0f} s (from the cache)"
            else:
                descriptors = sample_of(sizes, spatial)
                start = time.perf_counter()
                vocabularies[vocabulary_key] = make_vocabulary(args.seed).fit_sample(descriptors)
                seconds = time.perf_counter() - start
                vocabularies[vocabulary_key].save(path)
                write_json(path.with_suffix(".json"), {"seconds": seconds})
                source = f"vocabulary in {seconds:.0f} s"
                totals()  # its fit's memory peak is on record even if the run stops now
            vocabulary_seconds[vocabulary_key] = seconds
        vocabulary = vocabularies[vocabulary_key]
        encoder = make_encoder(vocabulary)
        if isinstance(encoder, BoFEncoder) and encoder.assignment == "soft" and encoder.sigma is None:
            # The kernel codebook's sigma, estimated as BoFEncoder.fit does (the RMS
            # distance to the nearest word) on the pass-1 sample; kept in the cache.
            sigma_path = cache / f"sigma-{slug(name)}.json"
            if not sigma_path.exists():
                sigma = clone(encoder).fit([sample_of(sizes, spatial)]).sigma_
                write_json(sigma_path, {"sigma": sigma})
            encoder.set_params(sigma=json.loads(sigma_path.read_text())["sigma"])
            source += f", sigma {encoder.sigma:.3f}"
        empty = np.zeros((0, vocabulary.descriptor_dim_), np.float32)
        pyramid = SpatialPyramid(encoder, levels=LEVELS).fit([empty])
        rows[name] = {"vocabulary s": None if shared else vocabulary_seconds[vocabulary_key]}
        encoders.append((name, pyramid, spatial, sizes))
        print(f"  {name}: {source}, peak memory {peak_memory_mb():,.0f} MB", flush=True)
    del samples, vocabularies

    # Pass 2: extract each image once, encode it with every variant's pyramid (and its
    # mirror image with the mirrored rows'), append to disk. Rows already complete in the
    # cache are skipped; each of the others resumes at the first image it lacks.
    stored = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        outputs = []
        for name, pyramid, spatial, sizes in encoders:
            for row, flip in [(name, False)] + ([(name + " + mirror", True)] if name in mirror else []):
                stored[row, split] = RowFile(cache / f"{slug(row)}-{split}.f16", pyramid.n_features_out_)
                if stored[row, split].n_rows < len(paths):
                    outputs.append((row, pyramid, spatial, flip, sizes))
        if not outputs:
            print(f"  pass 2, {split}: all {len(paths)} images in the cache")
            continue
        resume = min(stored[row, split].n_rows for row, *_ in outputs)
        if resume:
            print(f"  pass 2, {split}: resuming at image {resume}")
        for first in range(resume, len(paths), args.batch_size):
            batch = paths[first:first + args.batch_size]
            end = first + len(batch)
            # The rows still lacking some of these images (each skips what it has).
            needing = [o for o in outputs if stored[o[0], split].n_rows < end]
            start = time.perf_counter()
            images = {False: batch, True: mirrored(batch) if any(o[3] for o in needing) else None}
            # Each (mirrored?, bin sizes) extraction once, shared by the rows that use it; a
            # mirror row needs its image's plain view too.
            needed = {(False, sizes) for *_, sizes in needing} | {(True, sizes) for *_, flip, sizes in needing if flip}
            features = {(flip, sizes): extractors[sizes].transform(images[flip]) for flip, sizes in needed}
            timing["extraction"] += time.perf_counter() - start
            views, plain = {}, {}

            def view(flip, spatial, sizes):
                if (flip, spatial, sizes) not in views:
                    base = features[flip, sizes]
                    views[flip, spatial, sizes] = [augment_positions(f) for f in base] if spatial else base
                return views[flip, spatial, sizes]

            for row, pyramid, spatial, flip, sizes in needing:
                start = time.perf_counter()
                if not flip:
                    vectors = plain[row] = pyramid.transform(view(False, spatial, sizes))
                else:
                    # The mean of the two views' vectors: a linear classifier's score is the
                    # mean of its scores on each. (The row's own vectors are recomputed
                    # when that row already has these images.)
                    own = row[:-len(" + mirror")]
                    if own not in plain:
                        plain[own] = pyramid.transform(view(False, spatial, sizes))
                    vectors = (plain[own] + pyramid.transform(view(True, spatial, sizes))) / 2
                have = stored[row, split].n_rows - first
                stored[row, split].append(vectors[max(have, 0):], time.perf_counter() - start)
            done = first + len(batch)
            totals()
            print(f"  pass 2, {split}: {done}/{len(paths)} images, peak memory {peak_memory_mb():,.0f} MB",
                  end="\r", flush=True)
        print()

    # Random splits draw from train/ and test/ together, as many training images per
    # class as train/ has.
    y_pooled, n_train = np.concatenate([y_train, y_test]), np.bincount(y_train)
    results_path = cache / "results.json"
    measured = json.loads(results_path.read_text()) if results_path.exists() else {}
    results, table = [], ""
    for name, pyramid, *_ in encoders:
        reported = ([name] if wanted(name) else []) + ([name + " + mirror"] if name in mirror else [])
        for row in reported:
            train, test = stored[row, "train"], stored[row, "test"]
            timings = dict(rows[name])
            # A mirror row's vectors took its row's encoding and the mirrored views'.
            timings["encoding s"] = train.seconds + test.seconds + (
                stored[name, "train"].seconds + stored[name, "test"].seconds if row != name else 0.0)
            block = pyramid.encoder_.n_features_out_
            for variant, columns in ((row, block), (row + " + SPM", None)):
                m = measured.get(variant)
                have_splits = len(m.get("splits", [])) if m else 0
                if m is None or have_splits < args.splits:
                    start = time.perf_counter()
                    K_train = gram(train, train, columns)
                    K_test = gram(test, train, columns)
                    if m is None:
                        accuracy, C, _ = choose_c_and_score(K_train, y_train, K_test, y_test, args.seed)
                        m = measured[variant] = {"dim": columns or train.dim, "accuracy": accuracy, "C": C,
                                                 "training s": time.perf_counter() - start}
                    if have_splits < args.splits:
                        # Earlier splits are kept: split i is the same draw in every run.
                        K_pooled = pooled_kernel(K_train, K_test, gram(test, test, columns))
                        m["splits"] = m.get("splits", []) + [score_split(K_pooled, y_pooled, n_train, args.seed, i)
                                                             for i in range(have_splits, args.splits)]
                        del K_pooled
                    del K_train, K_test
                    write_json(results_path, measured)
                splits = m.get("splits", [])[:args.splits] or None
                results.append((variant, m["dim"], m["accuracy"], m["C"], timings, m["training s"], splits))
                spread = f", {len(splits)} random splits {format_splits(splits)}" if splits else ""
                print(f"  {variant}: dim {m['dim']:,}, balanced accuracy {100 * m['accuracy']:.1f}% "
                      f"(C={m['C']:g}){spread}", flush=True)
                # Written after every row, so an interrupted run keeps what it measured.
                table = write_table(args.out, results, train_paths, test_paths, totals())
    for row_file in stored.values():
        row_file.close()
    print(table)
    plot(args.out, results)
    return 0


def write_table(out, results, train_paths, test_paths, timing):
    peak = max(peak_memory_mb(), timing["peak MB"])
    lines = [
        (f"15-Scene, {len(train_paths)} train / {len(test_paths)} test images, dense RootSIFT "
         f"(step 4, bin sizes 4/6/8/10, and 3/4/6/8/10 for '+ 3px bins'); extraction {timing['extraction']:.0f} s for all encodings "
         f"together; peak resident memory {peak:,.0f} MB"
         + (f" (over the {timing['runs']} runs that filled the cache)." if timing.get("runs", 1) > 1 else ".")),
        "",
    ]
    n_splits = min((len(r[6]) if r[6] else 0) for r in results)
    if n_splits:
        lines[0] += (f" Random splits: mean ± standard deviation over {n_splits} random draws of "
                     f"{len(train_paths)} training images from all {len(train_paths) + len(test_paths)} "
                     "(same number per class; vocabularies fitted on train/ as above).")
    lines += [
        "| encoding | dim | balanced accuracy | C |" + (" random splits |" if n_splits else "")
        + " vocabulary s | encoding s | training s |",
        "|---|---|---|---|" + ("---|" if n_splits else "") + "---|---|---|",
    ]
    for variant, dim, accuracy, C, timings, training, splits in results:
        share = "(shared with the pyramid)" if "SPM" not in variant else f"{timings['encoding s']:.0f}"
        lines.append(f"| {variant} | {dim:,} | {100 * accuracy:.1f}% | {C:g} | "
                     + (f"{format_splits(splits[:n_splits])} | " if n_splits else "") +
                     f"{'shared' if timings['vocabulary s'] is None else format(timings['vocabulary s'], '.0f')} | "
                     f"{share} | {training:.0f} |")
    table = "\n".join(lines)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "scene15.md.partial"
    partial.write_text(table + "\n")
    partial.replace(out / "scene15.md")
    return table


def plot(out, results):
    out = Path(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install '.[bench]'): no plot")
    else:
        figure, axis = plt.subplots(figsize=(8, 1 + 0.22 * len(results)))
        names = [r[0] for r in results]
        axis.barh(names, [100 * r[2] for r in results], color=["#4c72b0" if "SPM" not in n else "#dd8452" for n in names])
        axis.set_xlabel("balanced accuracy on 15-Scene (%): bars, the test/ split")
        axis.set_xlim(50, 100)
        axis.invert_yaxis()
        split_rows = [(y, 100 * np.asarray(r[6])) for y, r in enumerate(results) if r[6] and len(r[6]) > 1]
        label_x = {y: a.mean() + a.std(ddof=1) for y, a in split_rows}  # the label clears the error bar
        for y, r in enumerate(results):
            axis.text(max(100 * r[2], label_x.get(y, 0)) + 0.4, y, f"{100 * r[2]:.1f}", va="center", fontsize=8)
        if split_rows:
            axis.errorbar([a.mean() for _, a in split_rows], [y for y, _ in split_rows],
                          xerr=[a.std(ddof=1) for _, a in split_rows], fmt="o", color="black", markersize=3,
                          capsize=2, label=f"{len(split_rows[0][1])} random splits, mean ± std")
            axis.legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        figure.savefig(out / "scene15.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
