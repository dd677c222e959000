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
    from vladkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()
