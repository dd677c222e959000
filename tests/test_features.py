import math

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

from vladkit import SIFT, DenseSIFT, ImageReadError, LocalFeatures, read_image, root_sift
from vladkit.features.dsift import dense_sift


def _check_inside(features, shape):
    h, w = shape
    x, y = features.positions[:, 0], features.positions[:, 1]
    assert np.all((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1))


def test_sift_on_china(china_path):
    (features,) = SIFT().transform([china_path])
    assert isinstance(features, LocalFeatures)
    n = len(features)
    assert n >= 500
    assert features.descriptors.dtype == np.float32 and features.descriptors.shape == (n, 128)
    assert features.image_shape == (427, 640)
    _check_inside(features, features.image_shape)
    assert np.all(features.scales > 0)


def test_root_sift_rows_are_unit_and_non_negative(china_path):
    plain = SIFT().transform([china_path])[0].descriptors
    root = SIFT(root=True).transform([china_path])[0].descriptors
    assert root.dtype == np.float32 and root.shape == plain.shape
    assert np.all(root >= 0)
    np.testing.assert_allclose(np.linalg.norm(root, axis=1), 1.0, atol=1e-5)
    # RootSIFT is sqrt of the L1-normalised descriptor, row by row.
    expected = np.sqrt(plain / plain.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(root, expected, rtol=1e-5, atol=1e-7)


def test_root_sift_keeps_zero_rows_zero():
    out = root_sift(np.array([[0, 0, 0], [1, 3, 0]], np.float32))
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_allclose(out[1], np.sqrt([0.25, 0.75, 0]))


def _documented_count(h, w, step, sizes):
    """The count DenseSIFT's docstring promises, written out independently."""
    total = 0
    for s in sizes:
        offset = math.floor(1.5 * (max(sizes) - s))
        n = lambda length: max(0, (length - 1 - offset - 3 * s) // step + 1)
        total += n(w) * n(h)
    return total


@pytest.mark.parametrize("shape,step,sizes", [
    ((200, 200), 4, (4, 6, 8, 10)),
    ((427, 640), 8, (4, 6, 8, 10)),
    ((97, 131), 3, (5,)),
    ((60, 41), 5, (8, 3)),
    ((30, 30), 4, (4, 6, 8, 10)),  # the largest size no longer fits
])
def test_dense_count_equals_documented_grid(make_textured, shape, step, sizes):
    image = make_textured(3, shape)
    features = DenseSIFT(step=step, sizes=sizes).transform([image])[0]
    assert len(features) == _documented_count(*shape, step, sizes)
    assert features.descriptors.shape == (len(features), 128)
    assert features.descriptors.dtype == np.float32
    _check_inside(features, shape)
    assert set(np.unique(features.scales * 3).round(4)) <= {float(s) for s in sizes}


def test_dense_on_china_and_root(china_path):
    plain = DenseSIFT().transform([china_path])[0]
    assert len(plain) == _documented_count(427, 640, 4, (4, 6, 8, 10))
    norms = np.linalg.norm(plain.descriptors, axis=1)
    assert np.all((np.abs(norms - 512) < 0.05) | (norms == 0))
    root = DenseSIFT(root=True).transform([china_path])[0].descriptors
    assert np.all(root >= 0)
    root_norms = np.linalg.norm(root, axis=1)
    nonzero = norms > 0
    np.testing.assert_allclose(root_norms[nonzero], 1.0, atol=1e-5)
    np.testing.assert_array_equal(root[~nonzero], 0)


def test_constant_image_gives_no_descriptors():
    flat = np.full((120, 160), 128, np.uint8)
    for extractor in (SIFT(), SIFT(root=True), DenseSIFT(low_contrast="drop"), DenseSIFT(root=True, low_contrast="drop")):
        features = extractor.transform([flat])[0]
        assert features.descriptors.shape == (0, 128)
        assert features.descriptors.dtype == np.float32
        assert features.positions.shape == (0, 2) and features.scales.shape == (0,)
        assert features.image_shape == (120, 160)
    # VLFeat PHOW's default keeps the grid and zeroes low-contrast descriptors.
    zeroed = DenseSIFT().transform([flat])[0]
    assert len(zeroed) == _documented_count(120, 160, 4, (4, 6, 8, 10))
    assert not np.any(zeroed.descriptors)


def test_image_smaller_than_a_descriptor():
    tiny = np.random.default_rng(0).integers(0, 256, (10, 10), dtype=np.uint8)
    assert DenseSIFT().transform([tiny])[0].descriptors.shape == (0, 128)


def _reference_descriptor(image, x0, y0, size):
    """One dense SIFT descriptor by the definition, pixel by pixel (no smoothing).

    Bin (r, c) has centre (x0 + c*size, y0 + r*size); each pixel's gradient magnitude is
    shared bilinearly between spatial bins (weight 1 - |d|/size per axis) and linearly
    between the two nearest of 8 orientation bins (angle counter-clockwise, y up); bins
    are weighted by the mean of a Gaussian of sigma 1.5*size over their footprint.
    """
    img = image.astype(np.float64) / 255
    h, w = img.shape
    gy, gx = np.gradient(img)
    hist = np.zeros((4, 4, 8))
    t = np.arange(-size + 1, size)
    window = [np.mean(np.exp(-0.5 * ((t - size * (b - 1.5)) / (1.5 * size)) ** 2)) for b in range(4)]
    for v in range(h):
        for u in range(w):
            magnitude = math.hypot(gx[v, u], gy[v, u])
            angle = math.atan2(-gy[v, u], gx[v, u]) % (2 * math.pi)
            o = angle / (2 * math.pi) * 8
            o0 = int(math.floor(o)) % 8
            frac = o - math.floor(o)
            for r in range(4):
                wy = 1 - abs(v - (y0 + r * size)) / size
                if wy <= 0:
                    continue
                for c in range(4):
                    wx = 1 - abs(u - (x0 + c * size)) / size
                    if wx <= 0:
                        continue
                    weight = wx * wy * window[r] * window[c] * magnitude
                    hist[r, c, o0] += (1 - frac) * weight
                    hist[r, c, (o0 + 1) % 8] += frac * weight
    d = hist.ravel()
    d = d / (np.linalg.norm(d) + 1e-7)
    d = np.minimum(d, 0.2)
    return 512 * d / np.linalg.norm(d)


def test_dense_matches_pixel_by_pixel_definition(make_textured):
    image = make_textured(7, (48, 52))
    size, step = 5, 6
    descriptors, positions, _, _ = dense_sift(image, step=step, sizes=(size,), smooth=False)
    checked = 0
    for descriptor, (cx, cy) in zip(descriptors, positions):
        x0, y0 = cx - 1.5 * size, cy - 1.5 * size
        # Away from the border, where no padding rule is involved.
        if x0 < size or y0 < size or x0 + 4 * size > image.shape[1] or y0 + 4 * size > image.shape[0]:
            continue
        expected = _reference_descriptor(image, int(x0), int(y0), size)
        np.testing.assert_allclose(descriptor, expected, rtol=1e-4, atol=2e-3)
        checked += 1
    assert checked >= 4


def test_dense_agrees_with_opencv_sift_at_the_same_keypoints(china_path):
    """Same layout and orientation convention as the sparse SIFT: OpenCV describing
    the same points (same smoothing) gives nearly the same descriptors."""
    grey = read_image(china_path)
    features = DenseSIFT(step=16, sizes=(8,), contrast_threshold=None).transform([grey])[0]
    # A bin of 8 pixels is 3 sigma: OpenCV's KeyPoint.size (2 sigma) is 16/3.
    keypoints = [cv2.KeyPoint(float(x), float(y), 2 * 8 / 3) for x, y in features.positions]
    keypoints, reference = cv2.SIFT_create().compute(grey, keypoints)
    assert len(keypoints) == len(features)
    a, b = features.descriptors, reference
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    assert np.mean(cosine) >= 0.97


@pytest.mark.parametrize("extractor", [SIFT(), DenseSIFT(root=True)], ids=["sift", "dense"])
def test_parallel_equals_serial_in_order(make_textured, extractor):
    rng = np.random.default_rng(0)
    images = [make_textured(i, (int(rng.integers(60, 120)), int(rng.integers(60, 120))))
              for i in range(200)]
    serial = clone(extractor).set_params(n_jobs=1).transform(images)
    parallel = clone(extractor).set_params(n_jobs=2).transform(images)
    assert len(serial) == len(parallel) == 200
    assert sum(len(f) for f in serial) > 200
    for one, two in zip(serial, parallel):
        assert one.image_shape == two.image_shape
        np.testing.assert_array_equal(one.descriptors, two.descriptors)
        np.testing.assert_array_equal(one.positions, two.positions)
        np.testing.assert_array_equal(one.scales, two.scales)


def test_scikit_learn_conventions(china_path):
    extractor = DenseSIFT(step=8, sizes=(6,), root=True)
    copy = clone(extractor)
    assert copy.get_params() == extractor.get_params()
    pipeline = make_pipeline(extractor)
    out = pipeline.fit_transform([china_path, china_path])
    assert len(out) == 2
    np.testing.assert_array_equal(out[0].descriptors, out[1].descriptors)
    assert repr(out[0]).startswith("LocalFeatures(n=")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match="list of images"):
        SIFT().transform("photo.jpg")
    with pytest.raises(ValueError, match="step"):
        DenseSIFT(step=0).transform([np.zeros((50, 50), np.uint8)])
    with pytest.raises(ValueError, match="sizes"):
        DenseSIFT(sizes=()).transform([np.zeros((50, 50), np.uint8)])
    with pytest.raises(ValueError, match="low_contrast"):
        DenseSIFT(low_contrast="keep").transform([np.zeros((50, 50), np.uint8)])
    with pytest.raises(ValueError, match="contrast_threshold"):
        SIFT(contrast_threshold=-1).transform([np.zeros((50, 50), np.uint8)])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        SIFT(n_jobs=2).transform([np.zeros((50, 50), np.uint8), bad])


def test_local_features_validates_shapes():
    with pytest.raises(ValueError, match="positions"):
        LocalFeatures(np.zeros((3, 128), np.float32), np.zeros((2, 2), np.float32),
                      np.zeros(3, np.float32), (10, 10))


@pytest.mark.skipif(__import__("vladkit._util.vlfeat", fromlist=["load"]).load() is None,
                    reason="VLFeat's libvl is not installed (apt-get install libvlfeat-dev)")
@pytest.mark.parametrize("shape", [(200, 200), (157, 233)])
def test_dense_matches_vlfeat_phow(china_path, shape):
    """The same grid, smoothing and window as VLFeat's vl_phow -> vl_dsift, in C."""
    from vladkit._util import vlfeat as vl

    grey = cv2.resize(read_image(china_path), shape[::-1], interpolation=cv2.INTER_AREA)
    theirs, frames = vl.phow_dsift(grey.astype(np.float32) / 255)
    ours, positions, _, contrast = dense_sift(grey)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(positions, frames[:, :2], atol=1e-6)
    np.testing.assert_allclose(contrast, frames[:, 3], rtol=1e-3, atol=1e-6)
    a, b = ours, vl.vlfeat_dsift_to_vladkit_order(theirs)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    textured = frames[:, 3] > 0.005
    assert np.mean(cosine[textured]) >= 0.999
