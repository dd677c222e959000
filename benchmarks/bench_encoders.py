"""Encoding speed and precision against the peers, side by side in one run: VLAD, Fisher
vector, BoF, on real descriptors.

    python benchmarks/bench_encoders.py [--data ../shared/data/scene15] [--n 10000]
        [--threads 2] [--repeats 21] [--cache DIR] [--synthetic]

Descriptors: dense RootSIFT (``DenseSIFT(root=True)``, bench_scene15's extractor) of
15-Scene ``test/`` images, the first ``--n`` (10,000) of them as one set; vocabularies
fitted on 60,000 descriptors of 150 ``train/`` images (10 per class), at the settings users
run: FV K=64 PCA-64 (the default), K=256 PCA-64 and K=256 without PCA; VLAD K=64 and 256;
BoF K=1000; the kernel codebook K=1000 and 4000. ``--synthetic`` times clustered
Gaussian blobs instead (the earlier table).
Median time of --repeats runs per implementation; every VLAD and BoF timing includes the
assignment step, every Fisher timing with PCA the projection (numpy for the peers).

* vladkit: VLADEncoder (hard, signed square root + intra + L2), FisherEncoder (improved),
  BoFEncoder (hard, L2; and the kernel codebook, ``assignment="soft"``, on the 5 nearest
  of K = 1000 and 4000 words, Hellinger, as bench_scene15's "KCB" rows).
* VLFeat 0.9.21 (Debian's libvlfeat1 through ctypes, OpenMP threads set to --threads):
  vl_kmeans_quantize + vl_vlad_encode (SQUARE_ROOT | NORMALIZE_COMPONENTS); its API takes
  a dense N x K assignment matrix, whose filling is timed with it. vl_fisher_encode
  (IMPROVED). BoF: vl_kmeans_quantize + numpy bincount.
* scikit-image's fisher_vector (improved, on an equivalent scikit-learn GaussianMixture).
* numpy: a plain vectorised implementation of the same formulas.
* floor: the bare BLAS matrix products the encoding cannot avoid (X C^T for VLAD/BoF,
  the PCA projection and [X^2, X] W for Fisher's log-likelihoods, float32), same threads.
* errors: the largest |difference| of vladkit's vector and of VLFeat float's from VLFeat's
  double-precision result on the same float32 input (the projected descriptors for FV);
  for the kernel codebook, which VLFeat lacks, of vladkit's from the numpy formula in
  float64.

Ratios: "x faster" is peer time / vladkit time; "x floor" is vladkit time / floor time.
Install the peers with ``apt-get install libvlfeat-dev`` and ``pip install ".[bench]"``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import vladkit  # noqa: F401  (first: it sets the BLAS / OpenMP thread waits before numpy loads)

import numpy as np
from threadpoolctl import threadpool_limits

from vladkit import BoFEncoder, FisherEncoder, GMMVocabulary, KMeansVocabulary, VLADEncoder, load_vocabulary
from vladkit import _vlfeat as vl
from vladkit.kernels import diagonal_gaussian_terms


def median_time(function, repeats):
    function()  # warm-up: JIT compilation, caches, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


# ------------------------------------------------------------------ VLFeat peers


def vlfeat_vlad(X, quantizer, C):
    labels, _ = quantizer(X)
    assignments = np.zeros((len(X), len(C)), dtype=np.float32)
    assignments[np.arange(len(X)), labels] = 1
    return vl.vlad_encode(X, C, assignments, vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS)


def vlfeat_bof(X, quantizer, C):
    labels, _ = quantizer(X)
    h = np.bincount(labels, minlength=len(C)).astype(np.float32)
    return h / max(np.linalg.norm(h), 1e-12)


def scene15_data(args):
    """(the encoded set: (n, 128) float32, the vocabularies' training sample) from 15-Scene."""
    from vladkit import DenseSIFT, labelled_images

    cache = Path(args.cache) / f"rootsift-{args.n}.npz" if args.cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            return stored["X"], stored["sample"]
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
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, X=X, sample=sample)
    return X, sample


def vocabulary(kind, k, pca, sample, args):
    cache = Path(args.cache) / f"{kind}-{k}-{pca}.npz" if args.cache else None
    if cache is not None and cache.is_file():
        return load_vocabulary(cache)
    if kind == "kmeans":
        fitted = KMeansVocabulary(k, max_descriptors=len(sample), n_init=1, max_iter=20, random_state=0)
    else:
        fitted = GMMVocabulary(k, pca=pca, max_descriptors=len(sample), max_iter=30, random_state=0)
    fitted.fit(sample)
    if cache is not None:
        fitted.save(cache)
    return fitted


def largest_error(vector, truth):
    return float(np.abs(np.asarray(vector, np.float64) - truth).max())


def run_vlad(k, X, kmeans, args, rows):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = VLADEncoder(vocabulary=kmeans).fit(images)
    peers = [("numpy", lambda: numpy_vlad(X, C))]
    errors = (None, None)
    if vl.load() is not None:
        quantizer = vl.KMeansQuantizer(C)
        peers.insert(0, ("VLFeat quantize + vlad_encode", lambda: vlfeat_vlad(X, quantizer, C)))
        labels = kmeans.predict(X)
        assignments = np.zeros((len(X), k))
        assignments[np.arange(len(X)), labels] = 1
        flags = vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS
        truth = vl.vlad_encode(X.astype(np.float64), C.astype(np.float64), assignments, flags)
        theirs = vl.vlad_encode(X, C, assignments.astype(np.float32), flags)
        errors = (largest_error(encoder.transform(images)[0], truth), largest_error(theirs, truth))
    timings(rows, ("VLAD (hard, sqrt + intra + L2)", k, "-"), lambda: encoder.transform(images),
            lambda: X @ C.T, peers, args.repeats, errors)


def run_bof(k, X, kmeans, args, rows):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = BoFEncoder(vocabulary=kmeans).fit(images)
    peers = [("numpy", lambda: numpy_bof(X, C))]
    if vl.load() is not None:
        quantizer = vl.KMeansQuantizer(C)
        peers.insert(0, ("VLFeat quantize + bincount", lambda: vlfeat_bof(X, quantizer, C)))
    timings(rows, ("BoF (hard, L2)", k, "-"), lambda: encoder.transform(images), lambda: X @ C.T, peers,
            args.repeats, (None, None))


def run_kcb(k, X, kmeans, args, rows):
    C = np.asarray(kmeans.centers_, np.float32)
    images = [X]
    encoder = BoFEncoder(vocabulary=kmeans, assignment="soft", power=0.5, norm="l2").fit(images)
    m, alpha = encoder.n_neighbors, 0.5 / encoder.sigma_**2
    truth = numpy_kcb(X.astype(np.float64), C.astype(np.float64), m, alpha)
    errors = (largest_error(encoder.transform(images)[0], truth), None)
    timings(rows, (f"kernel codebook ({m} nearest, Hellinger)", k, "-"), lambda: encoder.transform(images),
            lambda: X @ C.T, [("numpy", lambda: numpy_kcb(X, C, m, alpha))], args.repeats, errors)


def run_fisher(k, pca, X, gmm, args, rows):
    images = [X]
    encoder = FisherEncoder(vocabulary=gmm).fit(images)
    means, variances, weights = (np.asarray(a, np.float32) for a in (gmm.means_, gmm.covariances_, gmm.weights_))
    P = np.asarray(gmm.project(X), np.float32)
    project = (lambda: np.asarray(gmm.project(X), np.float32)) if pca else (lambda: X)
    features = np.concatenate([P * P, P], axis=1)
    coefficients = diagonal_gaussian_terms(means, variances, weights)[0].astype(np.float32)
    components = None if gmm.pca_components_ is None else np.asarray(gmm.pca_components_, np.float32)

    def floor():
        if components is not None:
            X @ components.T
        return features @ coefficients

    peers = [("numpy", lambda: numpy_fisher(project(), means, variances, weights))]
    errors = (None, None)
    if vl.load() is not None:
        peers.insert(0, ("VLFeat fisher_encode", lambda: vl.fisher_encode(project(), means, variances, weights,
                                                                           vl.FISHER_IMPROVED)))
        truth = vl.fisher_encode(P.astype(np.float64), *(a.astype(np.float64) for a in (means, variances, weights)),
                                 vl.FISHER_IMPROVED)
        theirs = vl.fisher_encode(P, means, variances, weights, vl.FISHER_IMPROVED)
        errors = (largest_error(encoder.transform(images)[0], truth), largest_error(theirs, truth))
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
    timings(rows, ("Fisher (improved)", k, f"PCA-{pca}" if pca else "none"), lambda: encoder.transform(images),
            floor, peers, args.repeats, errors)


def timings(rows, what, ours, floor, peers, repeats, errors):
    ours_t = median_time(ours, repeats)
    floor_t = median_time(floor, repeats)
    rows.append((*what, "vladkit", ours_t, None, ours_t / floor_t, errors[0]))
    rows.append((*what, "floor: bare matrix products", floor_t, None, 1.0, None))
    for name, function in peers:
        t = median_time(function, repeats)
        rows.append((*what, name, t, t / ours_t, None, errors[1] if name.startswith("VLFeat") else None))


def run_synthetic(k, args, X, rows):
    # Vocabularies from other descriptors than the encoded image's, as in practice (on its
    # own training data a k-means VLAD is ~0 by construction: centers are member means).
    training = make_data(len(X), X.shape[1], seed=1)
    kmeans = KMeansVocabulary(k, max_descriptors=len(X), n_init=1, max_iter=20, random_state=0).fit(training)
    gmm = GMMVocabulary(k, max_descriptors=len(X), max_iter=20, random_state=0).fit(training)
    run_vlad(k, X, kmeans, args, rows)
    run_fisher(k, None, X, gmm, args, rows)
    run_bof(k, X, kmeans, args, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"),
                        help="15-Scene folder with train/ and test/ (default: ../shared/data/scene15)")
    parser.add_argument("--n", type=int, default=10_000, help="descriptors in the encoded set (default 10,000)")
    parser.add_argument("--threads", type=int, default=2, help="threads on every side (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per measurement (default 21)")
    parser.add_argument("--cache", help="folder to keep the descriptors and vocabularies in, for reruns")
    parser.add_argument("--synthetic", action="store_true",
                        help="clustered Gaussian blobs (D=128, K=64 and 256) instead of 15-Scene")
    args = parser.parse_args(argv)

    import numba

    numba.set_num_threads(args.threads)
    if vl.load() is not None:
        vl.set_num_threads(args.threads)
    rows = []
    if args.synthetic:
        X = make_data(args.n, 128)
        source = "clustered Gaussian blobs (synthetic)"
    else:
        X, sample = scene15_data(args)
        source = f"dense RootSIFT of 15-Scene test/ images (vocabularies from {len(sample):,} train/ descriptors)"
    with threadpool_limits(limits=args.threads):
        if args.synthetic:
            for k in (64, 256):
                run_synthetic(k, args, X, rows)
        else:
            for k, pca in ((64, 64), (256, 64), (256, None)):
                run_fisher(k, pca, X, vocabulary("gmm", k, pca, sample, args), args, rows)
            for k in (64, 256):
                run_vlad(k, X, vocabulary("kmeans", k, None, sample, args), args, rows)
            run_bof(1000, X, vocabulary("kmeans", 1000, None, sample, args), args, rows)
            for k in (1000, 4000):
                run_kcb(k, X, vocabulary("kmeans", k, None, sample, args), args, rows)
    print(f"N = {len(X):,} descriptors, D = {X.shape[1]}, float32: {source}; {args.threads} threads everywhere, "
          f"median of {args.repeats} runs; VLFeat {'found' if vl.load() else 'NOT installed'}")
    print("| encoding | K | PCA | implementation | ms | vladkit is x faster | x floor | largest error vs double |")
    print("|---|---|---|---|---|---|---|---|")
    for encoding, k, pca, name, seconds, faster, floor, error in rows:
        print(f"| {encoding} | {k} | {pca} | {name} | {1000 * seconds:.2f} | "
              f"{'' if faster is None else f'{faster:.1f}'} | {'' if floor is None else f'{floor:.2f}'} | "
              f"{'' if error is None else f'{error:.1e}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
