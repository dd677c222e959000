"""15-Scene with the defaults a user gets, through the streaming path.

    python benchmarks/bench_scene15_defaults.py [--data ../shared/data/scene15]

``ImageEncoder(DenseSIFT(root=True), SpatialPyramid(FisherEncoder(64)))``, nothing tuned:
fit on ``train/`` (its default bounded descriptor sample), then the same protocol as
bench_scene15.py (precomputed linear kernel, SVC, C by 5-fold cross-validation, balanced
accuracy on ``test/``) for the whole-image Fisher vector (the pyramid's 1x1 cell) and the
pyramid. Holds both splits' vectors in memory (about 1.2 GB).
"""

import vladkit  # noqa: F401  (first: thread-wait settings before numpy loads)

import argparse
import sys
import time
from pathlib import Path

from bench_scene15 import choose_c_and_score

from vladkit import DenseSIFT, FisherEncoder, ImageEncoder, SpatialPyramid, labelled_images
from vladkit.encoders.normalize import l2_normalize


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"))
    args = parser.parse_args(argv)
    train, y_train, _ = labelled_images(Path(args.data) / "train")
    test, y_test, _ = labelled_images(Path(args.data) / "test")
    start = time.perf_counter()
    model = ImageEncoder(DenseSIFT(root=True, n_jobs=-1), SpatialPyramid(FisherEncoder(64, random_state=0)),
                         random_state=0).fit(train)
    X_train, X_test = model.transform(train), model.transform(test)
    print(f"fit + encode {time.perf_counter() - start:.0f} s, PCA {model.encoder_.encoder_.vocabulary_.pca}")
    block = model.encoder_.encoder_.n_features_out_
    plain_train, plain_test = l2_normalize(X_train[:, :block].copy()), l2_normalize(X_test[:, :block].copy())
    for name, a, b in (("FisherEncoder(64)", plain_train, plain_test),
                       ("SpatialPyramid(FisherEncoder(64))", X_train, X_test)):
        accuracy, C, _ = choose_c_and_score(a @ a.T, y_train, b @ a.T, y_test)
        print(f"{name}: balanced accuracy {100 * accuracy:.1f}% (C={C:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
