"""Encoding speed against the peers, side by side in one run: VLAD, Fisher vector, BoF.

    python benchmarks/bench_encoders.py [--n 10000] [--dim 128] [-k 64 256] [--threads 2]

One image of N descriptors (float32, D dimensions), K words, median time of --repeats
runs per implementation. Every VLAD and BoF timing includes the assignment step.

* vladkit: VLADEncoder (hard, signed square root + intra + L2), FisherEncoder (improved),
  BoFEncoder (hard, L2).
* VLFeat 0.9.21 (Debian's libvlfeat1 through ctypes, OpenMP threads set to --threads):
  vl_kmeans_quantize + vl_vlad_encode (SQUARE_ROOT | NORMALIZE_COMPONENTS); its API takes
  a dense N x K assignment matrix, whose filling is timed with it. vl_fisher_encode
  (IMPROVED). BoF: vl_kmeans_quantize + numpy bincount.
* scikit-image's fisher_vector (improved, on an equivalent scikit-learn GaussianMixture).
* numpy: a plain vectorised implementation of the same formulas.
* floor: the bare BLAS matrix products the encoding cannot avoid (X C^T for VLAD/BoF,
  [X^2, X] W for Fisher's log-likelihoods), same threads.

Ratios: "x faster" is peer time / vladkit time; "x floor" is vladkit time / floor time.
Install the peers with ``apt-get install libvlfeat-dev`` and ``pip install ".[bench]"``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import vladkit  # noqa: F401  (first: it sets the BLAS / OpenMP thread waits before numpy loads)

import numpy as np
from threadpoolctl import threadpool_limits

from vladkit import BoFEncoder, FisherEncoder, GMMVocabulary, KMeansVocabulary, VLADEncoder
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


def run(k, args, X, rows):
    # Vocabularies from other descriptors than the encoded image's, as in practice (on its
    # own training data a k-means VLAD is ~0 by construction: centers are member means).
    training = make_data(len(X), X.shape[1], seed=1)
    kmeans = KMeansVocabulary(k, max_descriptors=len(X), n_init=1, max_iter=20, random_state=0).fit(training)
    gmm = GMMVocabulary(k, max_descriptors=len(X), max_iter=20, random_state=0).fit(training)
    C = kmeans.centers_
    means, variances, weights = gmm.means_, gmm.covariances_, gmm.weights_
    images = [X]
    vlad = VLADEncoder(vocabulary=kmeans).fit(images)
    fisher = FisherEncoder(vocabulary=gmm).fit(images)
    bof = BoFEncoder(vocabulary=kmeans).fit(images)
    features = np.concatenate([X * X, X], axis=1)
    coefficients = diagonal_gaussian_terms(means, variances, weights)[0].astype(np.float32)
    repeats = args.repeats

    def timings(encoding, ours, floor, peers):
        ours_t = median_time(ours, repeats)
        floor_t = median_time(floor, repeats)
        rows.append((encoding, k, "vladkit", ours_t, None, ours_t / floor_t))
        rows.append((encoding, k, "floor: bare matrix products", floor_t, None, 1.0))
        for name, function in peers:
            t = median_time(function, repeats)
            rows.append((encoding, k, name, t, t / ours_t, None))

    have_vlfeat = vl.load() is not None
    if have_vlfeat:
        vl.set_num_threads(args.threads)
        quantizer = vl.KMeansQuantizer(C)
        np.testing.assert_allclose(vlad.transform(images)[0], vlfeat_vlad(X, quantizer, C), atol=1e-4)
    peers = [("numpy", lambda: numpy_vlad(X, C))]
    if have_vlfeat:
        peers.insert(0, ("VLFeat quantize + vlad_encode", lambda: vlfeat_vlad(X, quantizer, C)))
    timings("VLAD (hard)", lambda: vlad.transform(images), lambda: X @ C.T, peers)

    peers = [("numpy", lambda: numpy_fisher(X, means, variances, weights))]
    if have_vlfeat:
        peers.insert(0, ("VLFeat fisher_encode", lambda: vl.fisher_encode(X, means, variances, weights, vl.FISHER_IMPROVED)))
    try:
        from skimage.feature import fisher_vector
        from sklearn.mixture import GaussianMixture
    except ImportError:
        print("scikit-image not installed (pip install '.[bench]'): skipping its fisher_vector")
    else:
        twin = GaussianMixture(k, covariance_type="diag")
        twin.weights_, twin.means_, twin.covariances_ = weights, means, variances
        twin.precisions_cholesky_ = 1 / np.sqrt(variances)
        peers.append(("scikit-image fisher_vector", lambda: fisher_vector(X, twin, improved=True)))
    timings("Fisher (improved)", lambda: fisher.transform(images), lambda: features @ coefficients, peers)

    peers = [("numpy", lambda: numpy_bof(X, C))]
    if have_vlfeat:
        peers.insert(0, ("VLFeat quantize + bincount", lambda: vlfeat_bof(X, quantizer, C)))
    timings("BoF (hard)", lambda: bof.transform(images), lambda: X @ C.T, peers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="descriptors per image (default 10,000)")
    parser.add_argument("--dim", type=int, default=128, help="descriptor dimension (default 128)")
    parser.add_argument("-k", type=int, nargs="+", default=[64, 256], help="vocabulary sizes (default 64 256)")
    parser.add_argument("--threads", type=int, default=2, help="threads on every side (default 2)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per measurement (default 21)")
    args = parser.parse_args(argv)

    import numba

    numba.set_num_threads(args.threads)
    X = make_data(args.n, args.dim)
    rows = []
    with threadpool_limits(limits=args.threads):
        for k in args.k:
            run(k, args, X, rows)
    print(f"N = {args.n:,} descriptors, D = {args.dim}, float32, {args.threads} threads everywhere, "
          f"median of {args.repeats} runs; VLFeat {'found' if vl.load() else 'NOT installed'}")
    print("| encoding | K | implementation | ms | vladkit is x faster | x floor |")
    print("|---|---|---|---|---|---|")
    for encoding, k, name, seconds, faster, floor in rows:
        print(f"| {encoding} | {k} | {name} | {1000 * seconds:.2f} | "
              f"{'' if faster is None else f'{faster:.1f}'} | {'' if floor is None else f'{floor:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
