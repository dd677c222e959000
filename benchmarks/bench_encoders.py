"""Encoding speed and precision against the peers, side by side in one run: VLAD, Fisher
vector, BoF, on real descriptors; optionally the whole ``vladkit encode`` job against
extraction alone.

    python benchmarks/bench_encoders.py [--data ../shared/data/scene15] [--n 10000]
        [--threads 2] [--repeats 7] [--burst 5] [--settle 0.15] [--cache DIR] [--synthetic]
        [--no-vladkit-first] [--main-job] [--main-job-repeats 3]

Descriptors: dense RootSIFT (``DenseSIFT(root=True)``, bench_scene15's extractor) of
15-Scene ``test/`` images, the first ``--n`` (10,000) of them as one set, encoded as ONE
image (one ``transform([X])`` call); vocabularies fitted on 60,000 descriptors of 150
``train/`` images (10 per class), at the settings users run: FV K=64 PCA-64 (the
default), K=256 PCA-64 and K=256 without PCA; VLAD K=64 and 256; BoF K=1000; the kernel
codebook K=1000 and 4000. ``--synthetic`` times clustered Gaussian blobs instead (the
earlier table). Descriptors and vocabularies are kept in ``--cache`` (without it, in a
temporary folder that the child processes share and that is removed at the end).

Import order. This process imports numpy, scipy.linalg and threadpoolctl first, then
vladkit, as a user's script does. vladkit sets OPENBLAS_THREAD_TIMEOUT=4 and
OMP_WAIT_POLICY=PASSIVE at import (unless set). libgomp (numba, VLFeat) is not loaded yet
here and reads its variable later; numpy's and scipy's OpenBLAS are, and read theirs when
they loaded (their idle workers then spin after each product: 0.11 s of CPU measured on
this machine), until vladkit's import has them read it again and restarts their workers
(``vladkit._util.blas.apply_thread_timeout``; the header says what was loaded before
vladkit). The rows "vladkit (vladkit
imported first)" come from a child process, this script rerun with the hidden flag
``--vladkit-first``, which imports vladkit before numpy; it loads the same cached
descriptors and vocabulary files, builds the same encoders under the same thread limits,
and serves timings over a pipe (one JSON line per request), so that its calls are
interleaved with this process's (below). A twin child, ``--numpy-first-child``, imports
numpy first and is timed the same way: "numpy-first / vladkit-first" is the ratio of the
two children's medians (a child, idle between its turns, and this process, busy with the
other contenders, do not time alike: the ratio compares like with like). Child processes get the environment this script started with
(not the variables vladkit set in it).

Threads: ``--threads`` (2) on every side: numba (``numba.set_num_threads``), BLAS
(threadpoolctl ``threadpool_limits`` around the whole run) and VLFeat's OpenMP
(``vl_set_num_threads``); the header prints the values read back. vladkit's encoders are
called with their default ``n_jobs`` (None) inside those limits.

Timing. The contenders of one row group (one encoding, K and PCA) are timed round-robin:
each is warmed up once (JIT compilation, caches, thread pools), then each of
``--repeats`` rounds runs every contender in turn, in a random order (seeded), so that
drift on a shared machine hits all alike. A contender's turn is a burst, as a user's
loop over images calls an encoder: ``--settle`` seconds of sleep, one untimed call,
then ``--burst`` calls back to back, each timed; its time is the median of all its timed
calls. The sleep and the untimed call keep a turn from paying for the threads the
previous contender left spinning (numpy's OpenBLAS workers here, or this process's while
the child is timed); the calls back to back do pay for what the contender's own previous
call left behind (its BLAS pool spinning while its numba threads start, say), as they
would in a user's loop. The load average is printed before and after, with the date and
the CPU model.

* vladkit: VLADEncoder (hard, signed square root + intra + L2), FisherEncoder (improved,
  on the raw descriptors: its time includes the PCA projection), BoFEncoder (hard, L2;
  and the kernel codebook, ``assignment="soft"``, on the 5 nearest of K = 1000 and 4000
  words, Hellinger, as bench_scene15's "KCB" rows). Every VLAD and BoF timing includes
  the assignment to the words.
* VLFeat 0.9.21 (Debian's libvlfeat1 through ctypes), each peer at its best: its parts
  are timed apart, as separate contenders (each its own median), and the row's time is
  their sum, so that neither part suffers from the other's thread pool (the notes give
  the parts).
  - VLAD "VLFeat vlad_encode + BLAS quantisation": the nearest words by numpy BLAS,
    ``np.argmin(csq - 2 * (X @ C.T), axis=1)`` (C.T contiguous, csq the words' squared
    norms, float32), plus the dense N x K assignment matrix filled and
    ``vl_vlad_encode`` (SQUARE_ROOT | NORMALIZE_COMPONENTS); second row, VLFeat's own
    quantiser ``vl_kmeans_quantize`` + the same fill and ``vl_vlad_encode``.
  - BoF "BLAS quantisation + bincount": the same BLAS argmin, plus numpy bincount and
    L2; second row ``vl_kmeans_quantize`` + the same bincount and L2.
  - Fisher "VLFeat fisher_encode + numpy PCA": the projection ``(X - mean) @
    components.T`` by numpy float32 BLAS (the vocabulary's pca_mean_ and
    pca_components_) plus ``vl_fisher_encode`` (IMPROVED) of the projected descriptors;
    without PCA, ``vl_fisher_encode`` alone.
* scikit-image's fisher_vector (improved, on an equivalent scikit-learn GaussianMixture),
  the projection (the vocabulary's) inside its time.
* numpy: a plain vectorised implementation of the same formulas, one call each
  (assignment and projection included).
* floor: the bare BLAS matrix products the encoding cannot avoid (X C^T for VLAD/BoF,
  the PCA projection and [X^2, X] W for Fisher's log-likelihoods, float32), same threads.
* errors: the largest |difference| of vladkit's vector and of VLFeat float's from VLFeat's
  double-precision result on the same float32 input (the projected descriptors for FV,
  vladkit projecting them itself); for the improved Fisher vector measured before its
  signed square root (on v |v|, as tests/test_fisher_precision.py), whose infinite slope
  at 0 turns any 1e-12 difference into 1e-6; for the kernel codebook, which VLFeat lacks,
  of vladkit's from the numpy formula in float64.

Ratios: "x faster" is peer time / vladkit time (vladkit: this process, numpy first);
"x floor" is vladkit time / floor time.

Main job (``--main-job``, off by default: minutes). Wall-clock of the whole command, run
as a subprocess (the ``vladkit`` console script next to this interpreter, else
``python -m vladkit``, the same ``main``)::

    vladkit encode DATA/train --vocab V -o TMP/out-R.npz -j THREADS -q --features dense --root

over 15-Scene ``train/`` (1,498 images), for V = the cached FV vocabulary (GMM K=64
PCA-64) and the cached VLAD one (k-means K=64), which ``vladkit encode`` takes as they
are (they record no feature recipe; ``--features dense --root`` gives it, the other
extraction settings being DenseSIFT's defaults, as in the encoded set above). Timed:
interpreter start, imports, listing and reading the images, dense RootSIFT extraction,
encoding, the resumable shards and the .npz written. Each run writes a fresh output
path, deleted after the run (a rerun into a finished output would resume, instantly).

Against it, "extraction alone": this script rerun with the hidden flag
``--extract-only`` followed by the same encode arguments (with the VLAD vocabulary),
also timed wall-clock as a subprocess. It imports vladkit first and
``vladkit.app.commands``, as the command does, parses the arguments with vladkit's own
parser (``vladkit.app.cli.build_parser``), lists the images and builds the recipe as the
command does (``_recipe_from_args``), then, shard by shard as ``vladkit.pipeline.jobs`` does:
``Recipe.build(vocab, n_jobs)``, the extractor's ``max_pixels`` set, and under
``limit_threads(n_jobs)`` it consumes ``iter_batches(extractor, shard, max_memory,
max_images=batch_size, encoder=encoder)``: the same images read and extracted in the
same batches with the same threads, descriptors counted and discarded (no encoding, no
shard, no output). It also reports its in-process time (from after its imports to the
last image), printed as a note.

The image files are read once before the runs (page cache warm for all), and each job
runs once untimed on 2 of the images (numba's on-disk cache filled: no timed run
compiles). Each of ``--main-job-repeats`` rounds then runs the three jobs in turn
(rotated order); the table gives medians, images/s and the encode throughput as a
percentage of extraction alone's.

Install the peers with ``apt-get install libvlfeat-dev`` and ``pip install ".[bench]"``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The import order is fixed at process start, so it is decided here. The hidden child
# modes import vladkit before numpy (it sets OPENBLAS_THREAD_TIMEOUT and OMP_WAIT_POLICY,
# which only act on libraries loaded after it); the main process imports numpy, scipy's
# BLAS and threadpoolctl first, as a user's script does.
_ORIGINAL_ENV = dict(os.environ)
_CHILD_IMPORTS_VLADKIT_FIRST = any(flag in sys.argv[1:] for flag in ("--vladkit-first", "--extract-only"))
if _CHILD_IMPORTS_VLADKIT_FIRST:
    importlib.import_module("vladkit")
_WAIT_VARIABLES = ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY")
_ENV_AT_NUMPY_LOAD = {name: os.environ.get(name) for name in _WAIT_VARIABLES}

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

importlib.import_module("scipy.linalg")  # scipy's own OpenBLAS, loaded before vladkit too


def _loaded_libraries():
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return "unknown"
    return ", ".join(name for name in ("openblas", "libgomp") if name in text) or "neither"


_LOADED_BEFORE_VLADKIT = _loaded_libraries()

# vladkit after numpy (see above): its settings come too late for numpy's OpenBLAS.
from vladkit import (
    BoFEncoder,
    FisherEncoder,
    GMMVocabulary,
    KMeansVocabulary,
    VLADEncoder,
    load_vocabulary,
)
from vladkit._util import vlfeat as vl
from vladkit.kernels.gaussian import diagonal_gaussian_terms

SCRIPT = str(Path(__file__).resolve())
VLADKIT_FIRST = "vladkit (vladkit imported first)"
NUMPY_FIRST_CHILD = "vladkit (numpy imported first, child)"


# ------------------------------------------------------------------ timing


class Remote:
    """A contender timed elsewhere: calling it returns the seconds it measured."""

    def __init__(self, function):
        self.function = function

    def __call__(self, burst):
        return self.function(burst)


def interleaved(contenders, repeats, burst, settle, rng):
    """{name: median seconds} of ``contenders`` [(name, function)] timed round-robin:
    one warm-up call each, then ``repeats`` rounds in which every contender, in a random
    order, sleeps ``settle`` seconds, makes one untimed call and ``burst`` timed calls
    back to back (a :class:`Remote` contender does the same where it runs and returns
    its ``burst`` times)."""
    for _, function in contenders:
        function(1) if isinstance(function, Remote) else function()  # warm-up (the child's too)
    times = {name: [] for name, _ in contenders}
    for _ in range(repeats):
        for index in rng.permutation(len(contenders)):
            name, function = contenders[index]
            if settle:
                time.sleep(settle)
            if isinstance(function, Remote):
                times[name].extend(function(burst))
                continue
            function()
            for _ in range(burst):
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def make_data(n, dim, seed=0):
    """Clustered descriptors (SIFT has structure; uniform noise would flatter nobody)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (512, dim))
    labels = rng.integers(0, 512, n)
    return (centers[labels] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


# ------------------------------------------------------------------ numpy peers


def numpy_vlad(X, C):
    labels = np.argmin((C**2).sum(1) - 2 * X @ C.T, axis=1)
    V = np.zeros_like(C)
    np.add.at(V, labels, X)
    V -= np.bincount(labels, minlength=len(C))[:, None] * C
    V = np.sign(V) * np.sqrt(np.abs(V))
    V /= np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    V = V.ravel()
    return V / max(np.linalg.norm(V), 1e-12)


def numpy_fisher(X, means, variances, weights):
    coefficients, constants = diagonal_gaussian_terms(means, variances, weights)
    log_p = np.concatenate([X * X, X], axis=1) @ coefficients.astype(np.float32) + constants.astype(np.float32)
    log_p -= log_p.max(axis=1, keepdims=True)
    Q = np.exp(log_p)
    Q /= Q.sum(axis=1, keepdims=True)
    n = len(X)
    mass = Q.sum(0)[:, None]
    first = Q.T @ X
    second = Q.T @ (X * X)
    sigma = np.sqrt(variances)
    u = (first - mass * means) / sigma / (n * np.sqrt(weights)[:, None])
    v = ((second - 2 * first * means + mass * means**2) / variances - mass) / (n * np.sqrt(2 * weights)[:, None])
    z = np.concatenate([u.ravel(), v.ravel()])
    z = np.sign(z) * np.sqrt(np.abs(z))
    return z / max(np.linalg.norm(z), 1e-12)


def numpy_bof(X, C):
    labels = np.argmin((C**2).sum(1) - 2 * X @ C.T, axis=1)
    h = np.bincount(labels, minlength=len(C)).astype(np.float32)
    return h / max(np.linalg.norm(h), 1e-12)


def numpy_kcb(X, C, n_neighbors, alpha):
    """Kernel codebook on the n nearest words (argpartition over the (N, K) distances),
    Hellinger: vladkit's formula, vectorised."""
    d = (C**2).sum(1) - 2 * X @ C.T
    nearest = np.argpartition(d, n_neighbors - 1, axis=1)[:, :n_neighbors]
    d = np.take_along_axis(d, nearest, axis=1)
    w = np.exp(-alpha * (d - d.min(axis=1, keepdims=True)))
    w /= w.sum(axis=1, keepdims=True)
    h = np.sqrt(np.bincount(nearest.ravel(), weights=w.ravel(), minlength=len(C)))
    return h / max(np.linalg.norm(h), 1e-12)


# ------------------------------------------------------------------ peers' parts


def blas_quantizer(C):
    """The nearest words by numpy BLAS: argmin of ||c||^2 - 2 x.c (C.T contiguous)."""
    CT = np.ascontiguousarray(np.asarray(C, np.float32).T)
    csq = (CT * CT).sum(0)
    return lambda X: np.argmin(csq - 2 * (X @ CT), axis=1)


def vlfeat_vlad_from_labels(X, C, labels):
    """The dense N x K assignment matrix filled, then vl_vlad_encode."""
    assignments = np.zeros((len(X), len(C)), dtype=np.float32)
    assignments[np.arange(len(X)), labels] = 1
    return vl.vlad_encode(X, C, assignments, vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS)


def histogram(labels, k):
    h = np.bincount(labels, minlength=k).astype(np.float32)
    return h / max(np.linalg.norm(h), 1e-12)


# ------------------------------------------------------------------ data


def scene15_data(args):
    """(the encoded set: (n, 128) float32, the vocabularies' training sample, the file
    both are kept in) from 15-Scene."""
    from vladkit import DenseSIFT, labelled_images

    cache = Path(args.cache) / f"rootsift-{args.n}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["X"], stored["sample"], cache
    root = Path(args.data)
    train, y_train, _ = labelled_images(root / "train")
    test, _, _ = labelled_images(root / "test")
    extractor = DenseSIFT(root=True, n_jobs=args.threads)
    chosen = [path for c in np.unique(y_train) for path in np.asarray(train)[y_train == c][:10]]
    rng = np.random.default_rng(0)
    sample = np.concatenate([f.descriptors[rng.choice(len(f.descriptors), 400, replace=False)]
                             for f in extractor.transform(chosen)])
    parts, total = [], 0
    for path in test:
        descriptors = extractor.transform([path])[0].descriptors
        parts.append(descriptors)
        total += len(descriptors)
        if total >= args.n:
            break
    X = np.ascontiguousarray(np.concatenate(parts)[:args.n])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, X=X, sample=sample)
    return X, sample, cache


def vocabulary(kind, k, pca, sample, args, prefix=""):
    """(the vocabulary, its file): loaded from the cache folder, fitted and saved there
    first if missing (always loaded from the file, so that the child's is the same)."""
    cache = Path(args.cache) / f"{prefix}{kind}-{k}-{pca}.npz"
    if not cache.is_file():
        if kind == "kmeans":
            fitted = KMeansVocabulary(k, max_descriptors=len(sample), n_init=1, max_iter=20, random_state=0)
        else:
            fitted = GMMVocabulary(k, pca=pca, max_descriptors=len(sample), max_iter=30, random_state=0)
        fitted.fit(sample)
        fitted.save(cache)
    return load_vocabulary(cache), cache


def make_encoder(kind, vocab, X):
    """The vladkit encoder of a row group, fitted (the same in this process and the child)."""
    if kind == "vlad":
        encoder = VLADEncoder(vocabulary=vocab)
    elif kind == "fisher":
        encoder = FisherEncoder(vocabulary=vocab)
    elif kind == "bof":
        encoder = BoFEncoder(vocabulary=vocab)
    elif kind == "kcb":
        encoder = BoFEncoder(vocabulary=vocab, assignment="soft", power=0.5, norm="l2")
    else:
        raise ValueError(kind)
    return encoder.fit([X])


def largest_error(vector, truth):
    return float(np.abs(np.asarray(vector, np.float64) - truth).max())


# ------------------------------------------------------------------ the vladkit-first child


class VladkitFirstChild:
    """This script rerun with --vladkit-first (or ``flag``): it times vladkit's encoders on
    request. The --numpy-first-child twin imports numpy first, as this process does: the
    two children compare the import orders symmetrically, both timed the same way in a
    process that does nothing else."""

    def __init__(self, args, flag="--vladkit-first"):
        command = [sys.executable, SCRIPT, flag, "--threads", str(args.threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=_ORIGINAL_ENV)
        self.hello = self._reply()

    def _reply(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the --vladkit-first child died (exit status {self.process.wait()}); "
                               "its error is on stderr above")
        return json.loads(line)

    def timer(self, kind, vocabulary_file, data_file):
        request = {"encoder": kind, "vocabulary": str(vocabulary_file), "data": str(data_file)}

        def run(burst):
            self.process.stdin.write(json.dumps({**request, "burst": burst}) + "\n")
            self.process.stdin.flush()
            return self._reply()["seconds"]
        return Remote(run)

    def close(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def serve_vladkit_first(args):
    """The --vladkit-first child: vladkit was imported before numpy (top of the file).
    Reads JSON requests {encoder, vocabulary, data, burst} on stdin, one a line; answers
    each with {"seconds": [the times of ``burst`` calls ``encoder.transform([X])`` back
    to back, after one untimed]} on stdout."""
    import numba

    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else printed goes to stderr
    numba.set_num_threads(args.threads)
    data, encoders = {}, {}
    with threadpool_limits(limits=args.threads):
        blas = sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        protocol.write(json.dumps({"ready": True, "env_at_numpy_load": _ENV_AT_NUMPY_LOAD,
                                   "numba_threads": numba.get_num_threads(), "blas_threads": blas}) + "\n")
        for line in sys.stdin:
            request = json.loads(line)
            key = (request["encoder"], request["vocabulary"], request["data"])
            if key not in encoders:
                if request["data"] not in data:
                    with np.load(request["data"]) as stored:
                        data[request["data"]] = stored["X"]
                X = data[request["data"]]
                encoders[key] = (make_encoder(request["encoder"], load_vocabulary(request["vocabulary"]), X), [X])
            encoder, images = encoders[key]
            encoder.transform(images)
            seconds = []
            for _ in range(request["burst"]):
                start = time.perf_counter()
                encoder.transform(images)
                seconds.append(time.perf_counter() - start)
            protocol.write(json.dumps({"seconds": seconds}) + "\n")
    return 0


# ------------------------------------------------------------------ row groups


class Groups:
    """What every row group needs: the arguments, the child, the random order, the rows."""

    def __init__(self, args, child, data_file, numpy_child=None):
        self.args, self.child, self.data_file, self.numpy_child = args, child, data_file, numpy_child
        self.rng = np.random.default_rng(0)
        self.rows, self.ratios = [], []

    def time(self, what, kind, vocabulary_file, ours, floor, peers, composites=(), errors=(None, None)):
        """Time vladkit, its vladkit-first twin, the floor and the ``peers`` [(name,
        function)] round-robin; ``composites`` [(row name, [part names], note)] are rows
        whose time is the sum of the parts' medians (the parts are in ``peers`` and get
        no row of their own)."""
        contenders = [("vladkit", ours), ("floor", floor), *peers]
        if self.child is not None:
            contenders.insert(1, (VLADKIT_FIRST, self.child.timer(kind, vocabulary_file, self.data_file)))
        if self.numpy_child is not None:
            contenders.insert(1, (NUMPY_FIRST_CHILD, self.numpy_child.timer(kind, vocabulary_file, self.data_file)))
        t = interleaved(contenders, self.args.repeats, self.args.burst, self.args.settle, self.rng)
        ours_t, floor_t = t["vladkit"], t["floor"]
        self.rows.append((*what, "vladkit (numpy imported first)", ours_t, None, ours_t / floor_t, errors[0], ""))
        if self.child is not None:
            first_t = t[VLADKIT_FIRST]
            if self.numpy_child is not None:
                twin_t = t[NUMPY_FIRST_CHILD]
                self.ratios.append((what, twin_t / first_t))
                self.rows.append((*what, NUMPY_FIRST_CHILD, twin_t, None, twin_t / floor_t, None,
                                  f"numpy-first / vladkit-first (both children) = {twin_t / first_t:.2f}"))
            else:
                self.ratios.append((what, ours_t / first_t))
            self.rows.append((*what, VLADKIT_FIRST, first_t, None, first_t / floor_t, None,
                              f"this process / vladkit-first = {ours_t / first_t:.2f}"))
        self.rows.append((*what, "floor: bare matrix products", floor_t, None, 1.0, None, ""))
        parts = {part for _, names, _ in composites for part in names}
        for name, names, note in composites:
            total = sum(t[part] for part in names)
            detail = " + ".join(f"{1000 * t[part]:.2f} {part}" for part in names)
            self.rows.append((*what, name, total, total / ours_t, None,
                              errors[1] if name.startswith("VLFeat") else None,
                              f"= {detail} (medians timed apart){note}"))
        for name, _ in peers:
            if name not in parts:
                self.rows.append((*what, name, t[name], t[name] / ours_t, None,
                                  errors[1] if name.startswith("VLFeat") else None, ""))


def run_vlad(k, X, kmeans, vocabulary_file, groups):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = make_encoder("vlad", kmeans, X)
    peers, composites = [], []
    errors = (None, None)
    if vl.load() is not None:
        quantize_blas = blas_quantizer(C)
        quantize_vlfeat = vl.KMeansQuantizer(C)
        labels = quantize_blas(X)
        peers += [("BLAS argmin", lambda: quantize_blas(X)),
                  ("vl_kmeans_quantize", lambda: quantize_vlfeat(X)),
                  ("fill + vl_vlad_encode", lambda: vlfeat_vlad_from_labels(X, C, labels))]
        composites += [("VLFeat vlad_encode + BLAS quantisation", ["BLAS argmin", "fill + vl_vlad_encode"], ""),
                       ("VLFeat vlad_encode + vl_kmeans_quantize",
                        ["vl_kmeans_quantize", "fill + vl_vlad_encode"], "")]
        truth_labels = kmeans.predict(X)
        assignments = np.zeros((len(X), k))
        assignments[np.arange(len(X)), truth_labels] = 1
        flags = vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS
        truth = vl.vlad_encode(X.astype(np.float64), C.astype(np.float64), assignments, flags)
        theirs = vl.vlad_encode(X, C, assignments.astype(np.float32), flags)
        errors = (largest_error(encoder.transform(images)[0], truth), largest_error(theirs, truth))
    peers.append(("numpy", lambda: numpy_vlad(X, C)))
    groups.time(("VLAD (hard, sqrt + intra + L2)", k, "-"), "vlad", vocabulary_file,
                lambda: encoder.transform(images), lambda: X @ C.T, peers, composites, errors)


def run_bof(k, X, kmeans, vocabulary_file, groups):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = make_encoder("bof", kmeans, X)
    quantize_blas = blas_quantizer(C)
    labels = quantize_blas(X)
    peers = [("BLAS argmin", lambda: quantize_blas(X)), ("bincount + L2", lambda: histogram(labels, k))]
    composites = [("BLAS quantisation + bincount", ["BLAS argmin", "bincount + L2"], "")]
    if vl.load() is not None:
        quantize_vlfeat = vl.KMeansQuantizer(C)
        peers.append(("vl_kmeans_quantize", lambda: quantize_vlfeat(X)))
        composites.append(("VLFeat vl_kmeans_quantize + bincount", ["vl_kmeans_quantize", "bincount + L2"], ""))
    peers.append(("numpy", lambda: numpy_bof(X, C)))
    groups.time(("BoF (hard, L2)", k, "-"), "bof", vocabulary_file, lambda: encoder.transform(images),
                lambda: X @ C.T, peers, composites)


def run_kcb(k, X, kmeans, vocabulary_file, groups):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = make_encoder("kcb", kmeans, X)
    m, alpha = encoder.n_neighbors, 0.5 / encoder.sigma_**2
    truth = numpy_kcb(X.astype(np.float64), C.astype(np.float64), m, alpha)
    errors = (largest_error(encoder.transform(images)[0], truth), None)
    groups.time((f"kernel codebook ({m} nearest, Hellinger)", k, "-"), "kcb", vocabulary_file,
                lambda: encoder.transform(images), lambda: X @ C.T,
                [("numpy", lambda: numpy_kcb(X, C, m, alpha))], errors=errors)


def run_fisher(k, pca, X, gmm, vocabulary_file, groups):
    images = [X]
    encoder = make_encoder("fisher", gmm, X)
    means, variances, weights = (np.asarray(a, np.float32) for a in (gmm.means_, gmm.covariances_, gmm.weights_))
    P = np.asarray(gmm.project(X), np.float32)
    project = (lambda: np.asarray(gmm.project(X), np.float32)) if pca else (lambda: X)
    features = np.concatenate([P * P, P], axis=1)
    coefficients = diagonal_gaussian_terms(means, variances, weights)[0].astype(np.float32)
    components = None if gmm.pca_components_ is None else np.asarray(gmm.pca_components_, np.float32)
    mean = None if gmm.pca_mean_ is None else np.asarray(gmm.pca_mean_, np.float32)

    def floor():
        if components is not None:
            X @ components.T
        return features @ coefficients

    peers, composites = [], []
    errors = (None, None)
    if vl.load() is not None:
        peers.append(("vl_fisher_encode", lambda: vl.fisher_encode(P, means, variances, weights,
                                                                   vl.FISHER_IMPROVED)))
        if components is not None:
            peers.insert(0, ("numpy PCA", lambda: (X - mean) @ components.T))
            composites.append(("VLFeat fisher_encode + numpy PCA", ["numpy PCA", "vl_fisher_encode"], ""))
        else:
            composites.append(("VLFeat fisher_encode", ["vl_fisher_encode"], ", no projection"))
        truth = vl.fisher_encode(P.astype(np.float64), *(a.astype(np.float64) for a in (means, variances, weights)),
                                 vl.FISHER_IMPROVED)
        theirs = vl.fisher_encode(P, means, variances, weights, vl.FISHER_IMPROVED)
        # Before the signed square root (v |v|), as tests/test_fisher_precision.py: its
        # infinite slope at 0 turns a 1e-12 difference into 1e-6, whoever computed it.
        def before_root(v):
            v = np.asarray(v, np.float64)
            return v * np.abs(v)

        errors = (largest_error(before_root(encoder.transform(images)[0]), before_root(truth)),
                  largest_error(before_root(theirs), before_root(truth)))
    peers.append(("numpy", lambda: numpy_fisher(project(), means, variances, weights)))
    try:
        from skimage.feature import fisher_vector
        from sklearn.mixture import GaussianMixture
    except ImportError:
        print("scikit-image not installed (pip install '.[bench]'): skipping its fisher_vector")
    else:
        twin = GaussianMixture(k, covariance_type="diag")
        twin.weights_, twin.means_, twin.covariances_ = weights, means, variances
        twin.precisions_cholesky_ = 1 / np.sqrt(variances)
        peers.append(("scikit-image fisher_vector", lambda: fisher_vector(project(), twin, improved=True)))
    groups.time(("Fisher (improved)", k, f"PCA-{pca}" if pca else "none"), "fisher", vocabulary_file,
                lambda: encoder.transform(images), floor, peers, composites, errors)


def run_synthetic(k, X, args, groups):
    # Vocabularies from other descriptors than the encoded image's, as in practice (on its
    # own training data a k-means VLAD is ~0 by construction: centers are member means).
    training = make_data(len(X), X.shape[1], seed=1)
    prefix = f"synthetic-{len(X)}-"
    kmeans, kmeans_file = vocabulary("kmeans", k, None, training, args, prefix)
    gmm_file = Path(args.cache) / f"{prefix}gmm-{k}-None.npz"
    if not gmm_file.is_file():
        GMMVocabulary(k, max_descriptors=len(X), max_iter=20, random_state=0).fit(training).save(gmm_file)
    run_vlad(k, X, kmeans, kmeans_file, groups)
    run_fisher(k, None, X, load_vocabulary(gmm_file), gmm_file, groups)
    run_bof(k, X, kmeans, kmeans_file, groups)


# ------------------------------------------------------------------ the main job


def extract_only(cli_args):
    """The --extract-only child: what ``vladkit encode`` does with the same arguments,
    less the encoding and the output (see the module docstring). Prints one JSON line."""
    import vladkit.app.commands.encode as commands
    from vladkit._util.threads import limit_threads
    from vladkit.pipeline.budget import iter_batches
    from vladkit.app.cli import build_parser
    from vladkit.pipeline.recipe import Recipe, load_vocabulary_file
    from vladkit.features.images import list_images

    args = build_parser().parse_args(cli_args)
    start = time.perf_counter()
    paths = [os.fspath(path) for path in list_images(args.folder, recursive=not args.no_recursive)]
    vocab = load_vocabulary_file(args.vocab)
    recipe = Recipe.from_json(commands._recipe_from_args(args, vocab).to_json())
    shard_size = -(-args.shard_size // args.batch_size) * args.batch_size  # as encode_images rounds it
    n_jobs = args.jobs
    n_images = n_descriptors = 0
    skipped = []
    for first in range(0, len(paths), shard_size):
        shard = paths[first:first + shard_size]
        extractor, encoder = recipe.build(vocab, n_jobs=n_jobs)
        extractor.set_params(max_pixels=None if args.max_pixels == 0 else args.max_pixels)
        with limit_threads(n_jobs):
            for batch in iter_batches(extractor, shard, max_memory=args.max_memory, max_images=args.batch_size,
                                      encoder=encoder, on_unreadable=lambda index, error: skipped.append(index)):
                for _, pieces in batch:
                    for piece in pieces:
                        n_descriptors += len(piece.descriptors)
                    n_images += 1
                batch = pieces = piece = None  # not alive while the next batch is extracted
    seconds = time.perf_counter() - start
    shown = ("step", "sizes", "root", "max_side", "max_pixels", "n_jobs")
    print(json.dumps({"images": n_images, "skipped": len(skipped), "descriptors": n_descriptors,
                      "seconds_in_process": seconds, "extractor": type(extractor).__name__,
                      "extractor_params": {key: str(value) for key, value in extractor.get_params().items()
                                           if key in shown}}))
    return 0


def wall_clock(command):
    """(seconds, stdout) of a subprocess, started with this script's original environment."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_ORIGINAL_ENV, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout


def vladkit_command():
    """The ``vladkit`` console script of this interpreter's environment, else
    ``python -m vladkit`` (the same ``main``)."""
    script = Path(sys.executable).with_name("vladkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vladkit"]


def main_job(args, vocabularies):
    """The --main-job table: ``vladkit encode`` of train/ per vocabulary, and extraction
    alone, wall-clock, interleaved."""
    from vladkit.features.images import list_images

    train = Path(args.data) / "train"
    paths = list_images(train, recursive=True)
    for path in paths:  # the page cache warm for every run alike
        path.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="main-job-", dir=args.cache))
    warm_up = work / "warm-up"  # two images: numba's on-disk cache filled before any timed run
    warm_up.mkdir()
    for index, path in enumerate(paths[:2]):
        shutil.copyfile(path, warm_up / f"{index}{path.suffix}")
    cli = vladkit_command()
    outputs = iter(range(10**6))

    def encode_arguments(folder, vocabulary_file, output):
        return ["encode", str(folder), "--vocab", str(vocabulary_file), "-o", str(output), "-j", str(args.threads),
                "-q", "--features", "dense", "--root"]

    notes = {"extraction in-process": []}

    def encode_job(name, vocabulary_file):
        def run(folder=train):
            output = work / f"out-{next(outputs)}.npz"  # a fresh path: never resumed
            seconds, stdout = wall_clock(cli + encode_arguments(folder, vocabulary_file, output))
            with np.load(output) as written:
                notes[name] = f"{stdout.strip()}; vectors {written['vectors'].shape}"
            output.unlink()
            shutil.rmtree(Path(str(output) + ".parts"), ignore_errors=True)
            return seconds
        return run

    def extraction(folder=train):
        arguments = encode_arguments(folder, vocabularies["VLAD"][1], work / "never-written.npz")
        seconds, stdout = wall_clock([sys.executable, SCRIPT, "--extract-only", *arguments])
        report = json.loads(stdout.strip().splitlines()[-1])
        if folder == train:
            notes["extraction in-process"].append(report["seconds_in_process"])
            notes["extraction"] = report
        return seconds

    jobs = [("extraction alone", extraction),
            ("vladkit encode, Fisher K=64 PCA-64", encode_job("Fisher K=64 PCA-64", vocabularies["FV"][1])),
            ("vladkit encode, VLAD K=64", encode_job("VLAD K=64", vocabularies["VLAD"][1]))]
    times = {name: [] for name, _ in jobs}
    try:
        for _, function in jobs:
            function(warm_up)
        load_before = os.getloadavg()
        for repeat in range(args.main_job_repeats):
            for name, function in jobs[repeat % len(jobs):] + jobs[:repeat % len(jobs)]:
                times[name].append(function())
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(paths)
    medians = {name: statistics.median(values) for name, values in times.items()}
    extraction_t = medians["extraction alone"]
    report = notes["extraction"]
    print()
    print(f"Main job: {train}, {n:,} images ({report['descriptors']:,} descriptors), -j {args.threads}; wall-clock of "
          f"each job as a subprocess (interpreter start and imports included), median of {args.main_job_repeats} "
          f"run(s), the 3 jobs in turn after one untimed warm-up each on 2 images; load average before "
          f"{_load(load_before)}, after {_load(load_after)}")
    print(f"encode: {' '.join(Path(part).name if part == cli[0] else part for part in cli)} encode "
          f"{train} --vocab V -o TMP/out-R.npz -j {args.threads} -q --features dense --root "
          f"(a fresh output each run, deleted after it)")
    print("| job | s | images/s | throughput as % of extraction-only | runs (s) |")
    print("|---|---|---|---|---|")
    for name, _ in jobs:
        t = medians[name]
        print(f"| {name} | {t:.1f} | {n / t:.1f} | {100 * extraction_t / t:.0f}% | "
              f"{', '.join(f'{value:.1f}' for value in times[name])} |")
    in_process = statistics.median(notes["extraction in-process"])
    params = ", ".join(f"{k}={v}" for k, v in report["extractor_params"].items())
    print(f"extraction alone: the same encode arguments (VLAD vocabulary) through vladkit's own recipe, shards and "
          f"batches, {report['extractor']}({params}), {report['images']:,} images read ({report['skipped']} skipped), "
          f"descriptors discarded; {in_process:.1f} s of it in-process ({n / in_process:.1f} images/s), the rest "
          "interpreter start, imports and set-up")
    for name, _ in jobs[1:]:
        print(f"{name}: {notes[name.split(', ', 1)[1]]}")


def _load(values):
    return " ".join(f"{value:.2f}" for value in values)


# ------------------------------------------------------------------ main


def header(args, source, X, load_before, load_after, child):
    import numba

    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    except OSError:
        cpu = "unknown"
    with threadpool_limits(limits=args.threads):
        blas = sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
    vlfeat = vl.load()
    t = args.threads
    env = ", ".join(f"{name}={value or 'unset'}" for name, value in _ENV_AT_NUMPY_LOAD.items())
    print(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, {cpu}, "
          f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before {_load(load_before)}, after {_load(load_after)}")
    print(f"N = {len(X):,} descriptors, D = {X.shape[1]}, float32, encoded as one image: {source}")
    print(f"{t} threads on every side: numba {numba.get_num_threads()}, BLAS "
          f"{'/'.join(map(str, blas))} (threadpoolctl), VLFeat OpenMP "
          f"{vlfeat.vl_get_max_threads() if vlfeat else '-'} (vl_set_num_threads) (read back; --threads {t}); "
          "vladkit's encoders with their default n_jobs inside those limits")
    print(f"import order: numpy, scipy.linalg, threadpoolctl, then vladkit, as a user's script ({env} when numpy "
          f"loaded; {_LOADED_BEFORE_VLADKIT} loaded before vladkit)"
          + ("" if child is None else
             f"; '{VLADKIT_FIRST}': a child process importing vladkit before numpy "
             f"({', '.join(f'{k}={v}' for k, v in child.hello['env_at_numpy_load'].items())} when numpy loaded; "
             f"numba {child.hello['numba_threads']}, BLAS {'/'.join(map(str, child.hello['blas_threads']))} threads)"
             f"; '{NUMPY_FIRST_CHILD}': its twin, the same child importing numpy first"))
    print(f"median of {args.repeats} x {args.burst} calls: {args.repeats} rounds, the contenders of a group in random "
          f"order, each turn {args.settle} s of sleep, one untimed call and {args.burst} timed calls back to back; "
          f"VLFeat {'found' if vlfeat else 'NOT installed'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--n", type=int, default=10_000, help="descriptors in the encoded set (default 10,000)")
    parser.add_argument("--threads", type=int, default=2, help="threads on every side (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per row group (default 7)")
    parser.add_argument("--burst", type=int, default=5,
                        help="timed calls back to back per contender and round, after one untimed (default 5)")
    parser.add_argument("--settle", type=float, default=0.15,
                        help="seconds of sleep before every timed call, for idle thread pools (default 0.15)")
    parser.add_argument("--cache", help="folder to keep the descriptors and vocabularies in, for reruns "
                                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--synthetic", action="store_true",
                        help="clustered Gaussian blobs (D=128, K=64 and 256) instead of 15-Scene")
    parser.add_argument("--no-vladkit-first", action="store_true",
                        help="leave out the rows of the child process that imports vladkit first")
    parser.add_argument("--main-job", action="store_true",
                        help="also time 'vladkit encode' of 15-Scene train/ against extraction alone (minutes)")
    parser.add_argument("--main-job-repeats", type=int, default=3, help="runs of each main job (default 3)")
    parser.add_argument("--vladkit-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numpy-first-child", action="store_true", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--extract-only" in argv:
        return extract_only(argv[argv.index("--extract-only") + 1:])
    args = parser.parse_args(argv)
    if args.vladkit_first or args.numpy_first_child:
        return serve_vladkit_first(args)
    if args.main_job and args.synthetic:
        parser.error("--main-job encodes 15-Scene with its vocabularies: leave out --synthetic")

    import numba

    numba.set_num_threads(args.threads)
    if vl.load() is not None:
        vl.set_num_threads(args.threads)
    temporary = args.cache is None
    if temporary:
        args.cache = tempfile.mkdtemp(prefix="bench_encoders-")
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    child = numpy_child = None
    try:
        load_before = os.getloadavg()
        if args.synthetic:
            X = make_data(args.n, 128)
            data_file = Path(args.cache) / f"synthetic-{args.n}.npz"
            np.savez(data_file, X=X)
            source = "clustered Gaussian blobs (synthetic)"
        else:
            X, sample, data_file = scene15_data(args)
            source = f"dense RootSIFT of 15-Scene test/ images (vocabularies from {len(sample):,} train/ descriptors)"
        if not args.no_vladkit_first:
            child = VladkitFirstChild(args)
            numpy_child = VladkitFirstChild(args, "--numpy-first-child")
        groups = Groups(args, child, data_file, numpy_child)
        vocabularies = {}
        with threadpool_limits(limits=args.threads):
            if args.synthetic:
                for k in (64, 256):
                    run_synthetic(k, X, args, groups)
            else:
                for k, pca in ((64, 64), (256, 64), (256, None)):
                    gmm, gmm_file = vocabulary("gmm", k, pca, sample, args)
                    vocabularies.setdefault("FV", (gmm, gmm_file))
                    run_fisher(k, pca, X, gmm, gmm_file, groups)
                for k in (64, 256):
                    kmeans, kmeans_file = vocabulary("kmeans", k, None, sample, args)
                    vocabularies.setdefault("VLAD", (kmeans, kmeans_file))
                    run_vlad(k, X, kmeans, kmeans_file, groups)
                kmeans, kmeans_file = vocabulary("kmeans", 1000, None, sample, args)
                run_bof(1000, X, kmeans, kmeans_file, groups)
                for k in (1000, 4000):
                    kmeans, kmeans_file = vocabulary("kmeans", k, None, sample, args)
                    run_kcb(k, X, kmeans, kmeans_file, groups)
        for process in (child, numpy_child):
            if process is not None:
                process.close()
        load_after = os.getloadavg()
        header(args, source, X, load_before, load_after, child)
        print("| encoding | K | PCA | implementation | ms | vladkit is x faster | x floor | largest error vs double "
              "| notes |")
        print("|---|---|---|---|---|---|---|---|---|")
        for encoding, k, pca, name, seconds, faster, floor, error, note in groups.rows:
            print(f"| {encoding} | {k} | {pca} | {name} | {1000 * seconds:.2f} | "
                  f"{'' if faster is None else f'{faster:.1f}'} | {'' if floor is None else f'{floor:.2f}'} | "
                  f"{'' if error is None else f'{error:.1e}'} | {note} |")
        if groups.ratios:
            print("numpy-first / vladkit-first (the median of the child importing numpy first over the child "
                  "importing vladkit first, timed alike; > 1: importing vladkit first is faster): "
                  + "; ".join(f"{encoding.split(' (')[0]} K={k}{'' if pca == '-' else ' ' + pca}: {ratio:.2f}"
                              for (encoding, k, pca), ratio in groups.ratios))
        if args.main_job:
            main_job(args, vocabularies)
    finally:
        for process in (child, numpy_child):
            if process is not None and process.process.poll() is None:
                process.process.kill()
                process.process.wait()
        if temporary:
            shutil.rmtree(args.cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
