import io
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import sklearn


@pytest.fixture(scope="session")
def china_path():
    """scikit-learn's bundled photo (427 x 640 RGB JPEG)."""
    path = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")
    assert os.path.exists(path), path
    return path


def textured_image(seed, shape=(96, 128)):
    """A grey uint8 image with blobs and edges at random places: SIFT finds keypoints."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.zeros(shape, np.float64)
    for _ in range(12):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(3, 15)
        image += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    image += 0.05 * rng.standard_normal(shape)
    image = (image - image.min()) / (np.ptp(image) + 1e-12)
    return (image * 255).astype(np.uint8)


@pytest.fixture
def make_textured():
    return textured_image


def cli(*args):
    """Run ``vladkit ARGS`` in-process: (exit code, stdout, stderr). Usage errors, which
    argparse reports by raising SystemExit, give their exit code too."""
    from vladkit.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


SCENE15 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scene15")


def word_sets(n_words=8, dim=16, sizes=(40, 0, 1, 300, 7), seed=0):
    """(descriptor sets, KMeansVocabulary): sets of ``sizes`` rows around all words but the
    last, which lies far away (an empty word), and an empty set among them."""
    from vladkit import KMeansVocabulary

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (n_words, dim))
    centers[-1] += 50
    sets = []
    for n in sizes:
        labels = rng.integers(0, n_words - 1, n)
        sets.append((centers[labels] + 0.6 * rng.standard_normal((n, dim))).astype(np.float32))
    return sets, KMeansVocabulary.from_centers(centers.astype(np.float32))


def scene15_train_photos(n_classes, per_class):
    """The first ``per_class`` photos of each of the first ``n_classes`` classes of
    15-Scene's train/ (sorted); skips the test where 15-Scene is missing."""
    import glob

    paths = sorted(glob.glob(os.path.join(SCENE15, "train", "*", "*.jpg")))
    if not paths:
        pytest.skip(f"15-Scene is not at {os.path.abspath(SCENE15)} (tests on real photos)")
    by_class = {}
    for path in paths:
        by_class.setdefault(os.path.basename(os.path.dirname(path)), []).append(path)
    return [p for name in sorted(by_class)[:n_classes] for p in by_class[name][:per_class]]


def scene15_rootsift(n_words, max_descriptors):
    """Dense RootSIFT (step 8) of 4 15-Scene images (2 classes x 2) and k-means words on
    them; skips the test where 15-Scene is missing."""
    from vladkit import DenseSIFT, KMeansVocabulary

    chosen = scene15_train_photos(2, 2)
    features = DenseSIFT(root=True, step=8, n_jobs=2).transform(chosen)
    vocabulary = KMeansVocabulary(n_words, max_descriptors=max_descriptors, random_state=0).fit(features)
    return features, vocabulary
