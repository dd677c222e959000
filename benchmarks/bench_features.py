"""Local-feature extraction speed: images/s and descriptors/image over a folder of images.

    python benchmarks/bench_features.py ../shared/data/scene15/train [--limit 300] [--repeats 3]

Runs vladkit's SIFT and DenseSIFT (step 4, bin sizes 4/6/8/10, PHOW smoothing) with
n_jobs 1 and 2 over the same images (read from disk each time, as a user would), and, as
the peer, OpenCV's SIFT describing the same dense grid point by point (SIFT.compute on
grid keypoints, the usual way to get dense SIFT from OpenCV) on a few images, and VLFeat's
vl_phow dense SIFT in C (Debian's libvlfeat1 through ctypes) on all of them. Each
configuration runs --repeats times; the table gives medians. OpenCV parallelises parts of
SIFT internally, so even n_jobs=1 can use more than one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import cv2
import numpy as np

from vladkit import SIFT, DenseSIFT, list_images, read_image


def extract_counts(extractor, paths, batch_size=64):
    """Extract every image, keeping only descriptor counts (a dataset's dense descriptors
    would not fit in memory: 1,498 images x 7,746 x 128 float32 is 6 GB)."""
    counts = []
    for start in range(0, len(paths), batch_size):
        counts.extend(len(f) for f in extractor.transform(paths[start:start + batch_size]))
    return counts


def time_runs(function, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def opencv_dense_grid(paths, dense):
    """The peer: OpenCV SIFT.compute on the keypoints of DenseSIFT's grid, size by size,
    each size on the image smoothed as DenseSIFT smooths it."""
    sift = cv2.SIFT_create()
    counts = []
    for path in paths:
        grey = read_image(path)
        grid = dense.transform([grey])[0]
        n = 0
        for size in dense.sizes:
            at_size = np.isclose(grid.scales * 3, size)
            sigma = np.sqrt(max((size / 6) ** 2 - 0.25, 0))
            smoothed = cv2.GaussianBlur(grey, (0, 0), sigma) if sigma > 0 else grey
            keypoints = [cv2.KeyPoint(float(x), float(y), 2 * size / 3)
                         for x, y in grid.positions[at_size]]
            keypoints, descriptors = sift.compute(smoothed, keypoints)
            n += len(keypoints)
        counts.append(n)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--limit", type=int, default=300, help="use the first N images (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--peer-images", type=int, default=5,
                        help="images for the slow OpenCV point-by-point peer (default 5; 0 skips it)")
    args = parser.parse_args(argv)

    paths = list_images(args.folder, recursive=True)[: args.limit]
    if not paths:
        parser.error(f"no images found in {args.folder!r}")
    print(f"{len(paths)} images from {args.folder}, {args.repeats} runs each, medians; "
          f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} OpenCV threads")

    rows = []
    configs = [("SIFT", SIFT()), ("DenseSIFT", DenseSIFT()), ("DenseSIFT root", DenseSIFT(root=True))]
    for name, extractor in configs:
        for n_jobs in (1, 2):
            extractor.set_params(n_jobs=n_jobs)
            seconds, counts = time_runs(lambda: extract_counts(extractor, paths), args.repeats)
            per_image = statistics.median(counts)
            rows.append((name, n_jobs, len(paths), len(paths) / seconds, 1000 * seconds / len(paths), per_image))

    from vladkit._util import vlfeat as vl

    if vl.load() is not None:
        # VLFeat's PHOW dense SIFT in C (vl_imsmooth + vl_dsift per size), same grid and
        # smoothing, single-threaded as VLFeat's dsift is; reading the images included.
        vl.set_num_threads(1)
        phow = lambda: [len(vl.phow_dsift(read_image(p).astype(np.float32) / 255)[0]) for p in paths]
        seconds, counts = time_runs(phow, args.repeats)
        rows.append(("VLFeat vl_phow dense SIFT (C, peer)", 1, len(paths), len(paths) / seconds,
                     1000 * seconds / len(paths), statistics.median(counts)))
    else:
        print("VLFeat not installed (apt-get install libvlfeat-dev): skipping vl_dsift")

    if args.peer_images > 0:
        peer_paths = paths[: args.peer_images]
        seconds, counts = time_runs(lambda: opencv_dense_grid(peer_paths, DenseSIFT()), 1)
        rows.append(("OpenCV compute on the dense grid (peer)", 1, len(peer_paths),
                     len(peer_paths) / seconds, 1000 * seconds / len(peer_paths), statistics.median(counts)))

    header = "| extractor | n_jobs | images | images/s | ms/image | descriptors/image |"
    print(header)
    print("|" + "---|" * 6)
    for name, n_jobs, n, rate, ms, per_image in rows:
        print(f"| {name} | {n_jobs} | {n} | {rate:.1f} | {ms:.1f} | {per_image:.0f} |")
    dense_ms = {n_jobs: ms for name, n_jobs, _, _, ms, _ in rows if name == "DenseSIFT"}
    peers = {name: ms for name, _, _, _, ms, _ in rows}
    if "VLFeat vl_phow dense SIFT (C, peer)" in peers:
        print(f"\nDenseSIFT (n_jobs=1) takes {dense_ms[1] / peers['VLFeat vl_phow dense SIFT (C, peer)']:.2f}x "
              "the time of VLFeat's vl_dsift for the same grid and smoothing.")
    if args.peer_images > 0:
        peer_ms = rows[-1][4]
        print(f"DenseSIFT (n_jobs=1) is {peer_ms / dense_ms[1]:.0f}x faster per image than OpenCV "
              "describing the same grid point by point.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
