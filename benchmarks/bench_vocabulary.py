"""Vocabulary training: time and quality against the peers, side by side in one run.

    python benchmarks/bench_vocabulary.py [--data ../shared/data/scene15/train] [--n 200000]
                                          [-k 256] [--gmm-k 64] [--repeats 3]

Descriptors: dense RootSIFT from the images of --data (the descriptors vladkit is trained
on in practice), or, without --data, Gaussian blobs of the same size. Then:

* k-means, K centers on N x 128 float32: vladkit's KMeansVocabulary (algorithm="auto",
  which is scikit-learn below K = 1024 and faiss from there on), vladkit's faiss path
  (algorithm="faiss": random initialisation, 20 Lloyd iterations), scikit-learn's KMeans
  called directly with the same settings as vladkit's (Lloyd, k-means++, 100
  iterations, tol 1e-4, one init), and faiss's Kmeans (100 iterations, all N points
  used). Quality is the inertia (sum of squared distances to the nearest center) of
  every result, computed by the same exact float64 code.
* GMM, diagonal, on the data reduced by PCA to 64 dimensions: vladkit's GMMVocabulary
  against scikit-learn's GaussianMixture called directly; quality is the average
  log-likelihood of the same data under each model.

Each timing is the median of --repeats runs (seeds 0, 1, ...); ratios are to vladkit.
faiss (a vladkit dependency) is loaded as vladkit loads it, with the OpenBLAS kernel this
CPU supports (vladkit._util.blas.load_faiss), for vladkit's rows and the peer's alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_info

from vladkit import DenseSIFT, DescriptorSampler, GMMVocabulary, KMeansVocabulary, list_images
from vladkit._util.blas import load_faiss
from vladkit.kernels.nearest import nearest_words


def load_descriptors(folder, n, seed):
    paths = list_images(folder, recursive=True)
    extractor = DenseSIFT(root=True, n_jobs=-1)
    sampler = DescriptorSampler(len(paths), n, seed=seed)
    for start in range(0, len(paths), 64):
        for offset, features in enumerate(extractor.transform(paths[start:start + 64])):
            sampler.add(start + offset, features.descriptors)
    return sampler.sample()


def blobs(n, dim, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (1000, dim))
    labels = rng.integers(0, 1000, n)
    return (centers[labels] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def inertia(X, centers):
    return float(nearest_words(X.astype(np.float64), np.asarray(centers, np.float64))[1].sum())


def timed(function, repeats):
    times, results = [], []
    for seed in range(repeats):
        start = time.perf_counter()
        results.append(function(seed))
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="folder of images to take dense RootSIFT from (default: synthetic)")
    parser.add_argument("--n", type=int, default=200_000, help="descriptors (default 200,000)")
    parser.add_argument("-k", type=int, default=256, help="k-means centers (default 256)")
    parser.add_argument("--gmm-k", type=int, default=64, help="GMM components (default 64)")
    parser.add_argument("--gmm-pca", type=int, default=64, help="PCA dimension before the GMM (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    X = load_descriptors(args.data, args.n, 0) if args.data else blobs(args.n, 128, 0)
    source = f"dense RootSIFT from {args.data}" if args.data else "synthetic blobs"
    blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    print(f"{len(X):,} x {X.shape[1]} float32 descriptors ({source}); {blas}; medians of {args.repeats}")

    rows = []
    seconds, models = timed(lambda s: KMeansVocabulary(args.k, max_descriptors=len(X), random_state=s).fit(X),
                            args.repeats)
    rows.append(("k-means", f"vladkit KMeansVocabulary ({models[0].algorithm_})", seconds,
                 statistics.median(inertia(X, m.centers_) for m in models)))
    seconds, models = timed(lambda s: KMeansVocabulary(args.k, algorithm="faiss", max_descriptors=len(X),
                                                       random_state=s).fit(X), args.repeats)
    rows.append(("k-means", f"vladkit KMeansVocabulary(algorithm='faiss'), {models[0].n_iter_} iterations",
                 seconds, statistics.median(inertia(X, m.centers_) for m in models)))
    seconds, models = timed(lambda s: KMeans(args.k, n_init=1, max_iter=100, tol=1e-4, random_state=s).fit(X),
                            args.repeats)
    rows.append(("k-means", "scikit-learn KMeans", seconds,
                 statistics.median(inertia(X, m.cluster_centers_) for m in models)))
    load_faiss()
    try:
        import faiss
    except ImportError:
        print("faiss not installed: skipping it")
    else:
        def run_faiss(seed):
            model = faiss.Kmeans(X.shape[1], args.k, niter=100, seed=seed + 1,
                                 max_points_per_centroid=len(X), verbose=False)
            model.train(X)
            return model
        seconds, models = timed(run_faiss, args.repeats)
        rows.append(("k-means", f"faiss Kmeans {faiss.__version__}", seconds,
                     statistics.median(inertia(X, m.centroids) for m in models)))

    seconds, models = timed(lambda s: GMMVocabulary(args.gmm_k, pca=args.gmm_pca, max_descriptors=len(X),
                                                    random_state=s).fit(X), args.repeats)
    projected = models[0].project(X).astype(np.float64)
    rows.append(("GMM", "vladkit GMMVocabulary", seconds,
                 statistics.median(m.score(X) for m in models)))
    floor = 1e-4 * projected.var(axis=0).max()
    seconds, models = timed(lambda s: GaussianMixture(args.gmm_k, covariance_type="diag", reg_covar=floor,
                                                      random_state=s).fit(projected), args.repeats)
    rows.append(("GMM", "scikit-learn GaussianMixture", seconds,
                 statistics.median(m.score(projected) for m in models)))

    print("| task | implementation | seconds | time / vladkit | quality | quality / vladkit |")
    print("|---|---|---|---|---|---|")
    reference = {}
    for task, name, seconds, quality in rows:
        reference.setdefault(task, (seconds, quality))
        ref_seconds, ref_quality = reference[task]
        label = "inertia" if task == "k-means" else "avg log-likelihood"
        print(f"| {task} | {name} | {seconds:.2f} | {seconds / ref_seconds:.2f} | "
              f"{label} {quality:.6g} | {quality / ref_quality:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
