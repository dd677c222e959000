"""Geometric verification (vladkit.retrieval.spatial): matching, robust fits, clean zero results."""

import glob
import os
import warnings

import cv2
import numpy as np
import pytest

from vladkit import SIFT, LocalFeatures
from vladkit.retrieval.spatial import Verification, match_descriptors, spatial_score, verify

SCENE15 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scene15", "test")


# -- matching ---------------------------------------------------------------------------


def _reference_matches(query, candidate, ratio, mutual):
    """The obvious loops: float64 distances, argsort per row and per column."""
    q = query.astype(np.float64)
    c = candidate.astype(np.float64)
    d = ((q[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    pairs = []
    for i in range(len(q)):
        order = np.argsort(d[i], kind="stable")
        j, second = order[0], order[1]
        if not d[i, j] < ratio ** 2 * d[i, second]:
            continue
        if mutual and np.argsort(d[:, j], kind="stable")[0] != i:
            continue
        pairs.append((i, j))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _random_descriptors(seed, n_q=41, n_c=57, dim=16):
    """Candidates that include noisy copies of some query rows, so that both passing and
    failing ratio tests and mutual checks occur."""
    rng = np.random.default_rng(seed)
    query = rng.random((n_q, dim), dtype=np.float32)
    candidate = rng.random((n_c, dim), dtype=np.float32)
    copies = rng.choice(n_q, size=n_c // 2, replace=True)  # repeats: one-to-many cases
    candidate[: n_c // 2] = query[copies] + rng.normal(0, 0.08, (n_c // 2, dim)).astype(np.float32)
    return query, candidate


@pytest.mark.parametrize("mutual", [True, False])
@pytest.mark.parametrize("block_elements", [1, 57 * 5, 1 << 22])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_match_descriptors_agrees_with_brute_force(seed, block_elements, mutual):
    query, candidate = _random_descriptors(seed)
    for ratio in (0.6, 0.8, 1.0):
        got = match_descriptors(query, candidate, ratio, mutual=mutual, block_elements=block_elements)
        expected = _reference_matches(query, candidate, ratio, mutual)
        assert got.dtype == np.int64 and got.shape[1] == 2
        np.testing.assert_array_equal(got, expected)
    # The data exercise both outcomes of each test.
    assert 0 < len(match_descriptors(query, candidate, 0.8, mutual=mutual)) < len(query)


def test_mutual_check_removes_many_to_one_matches():
    query, candidate = _random_descriptors(3)
    loose = match_descriptors(query, candidate, 1.0, mutual=False)
    strict = match_descriptors(query, candidate, 1.0, mutual=True)
    assert len(np.unique(loose[:, 1])) < len(loose)  # several query rows on one candidate
    assert len(np.unique(strict[:, 1])) == len(strict)
    assert set(map(tuple, strict)) <= set(map(tuple, loose))


def test_match_descriptors_does_not_assume_unit_norm():
    # Raw SIFT scale (norm ~512) and integer input give the same matches as rescaled rows.
    query, candidate = _random_descriptors(4)
    scaled = match_descriptors(query * 512, candidate * 512)
    np.testing.assert_array_equal(scaled, match_descriptors(query, candidate))
    # Integer input is converted to float32 (exact for 8-bit descriptors).
    q8, c8 = (np.round(x * 255).astype(np.uint8) for x in (query, candidate))
    np.testing.assert_array_equal(match_descriptors(q8, c8),
                                  match_descriptors(q8.astype(np.float32), c8.astype(np.float32)))


@pytest.mark.parametrize("n_q, n_c", [(0, 5), (5, 0), (0, 0), (5, 1), (0, 1)])
def test_match_descriptors_empty_and_single_row(n_q, n_c):
    rng = np.random.default_rng(0)
    got = match_descriptors(rng.random((n_q, 8), np.float32), rng.random((n_c, 8), np.float32))
    assert got.shape == (0, 2) and got.dtype == np.int64


def test_match_descriptors_identical_candidates_fail_the_ratio_test():
    # Two equally near candidates: d1 == d2, an ambiguous match, rejected.
    query = np.ones((1, 4), np.float32)
    assert match_descriptors(query, np.ones((2, 4), np.float32), ratio=1.0).shape == (0, 2)


def test_match_descriptors_rejects_bad_input():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="columns"):
        match_descriptors(a, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        match_descriptors(np.zeros(4), a)
    with pytest.raises(ValueError, match="NaN"):
        match_descriptors(np.full((3, 4), np.nan), a)
    with pytest.raises(ValueError, match="ratio"):
        match_descriptors(a, a, ratio=1.5)
    with pytest.raises(ValueError, match="block_elements"):
        match_descriptors(a, a, block_elements=0)


# -- verification on real photos --------------------------------------------------------


def _photos():
    """Four 15-Scene test photos, at a quarter, half, ... of the sorted list (bedroom,
    highway, mountain, store: 87 to 494 SIFT keypoints each)."""
    paths = sorted(glob.glob(os.path.join(SCENE15, "*", "*.jpg")))
    if not paths:
        pytest.skip(f"15-Scene test photos not found at {os.path.abspath(SCENE15)}")
    return [cv2.imread(paths[i * len(paths) // 4], cv2.IMREAD_GRAYSCALE) for i in range(4)]


def _corners(transform, shape):
    h, w = shape
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64)
    return corners @ transform[:, :2].T + transform[:, 2]


#: A known similarity (rotation 15 deg, scale 0.8 about the centre, then a shift of
#: (6, -4) px) and a known affine map (shear and anisotropic scale) of 200 x 200 photos.
_SIMILARITY = cv2.getRotationMatrix2D((100, 100), 15, 0.8) + np.array([[0, 0, 6], [0, 0, -4]])
_AFFINE = np.array([[1.0, 0.3, -20.0], [0.1, 0.9, 10.0]])


@pytest.fixture(scope="module")
def photo_features():
    """RootSIFT of the photos, and of each photo warped by the known maps."""
    photos = _photos()
    extractor = SIFT(root=True)
    warped = {
        name: [cv2.warpAffine(p, m, p.shape[::-1]) for p in photos]
        for name, m in (("similarity", _SIMILARITY), ("affine", _AFFINE))
    }
    return {
        "original": extractor.transform(photos),
        **{name: extractor.transform(images) for name, images in warped.items()},
    }


@pytest.mark.parametrize("model, truth", [("similarity", _SIMILARITY), ("affine", _AFFINE)])
def test_known_transform_is_recovered(photo_features, model, truth):
    for query, candidate in zip(photo_features["original"], photo_features[model]):
        result = spatial_score(query, candidate, model)
        # Measured: 90-100 % of the tentative matches are inliers (the affine warp changes
        # descriptors more, so it has a few more wrong matches); corners within 0.5 px.
        share = result.n_inliers / len(result.matches)
        assert result.n_inliers >= 30 and share >= 0.75, (result, share)
        estimated = _corners(result.transform, query.image_shape)
        np.testing.assert_allclose(estimated, _corners(truth, query.image_shape), atol=2.0)
        # Inliers are exactly the matches the transformation maps within the threshold.
        pairs = result.matches[result.inliers]
        q = query.positions[pairs[:, 0]].astype(np.float64)
        c = candidate.positions[pairs[:, 1]].astype(np.float64)
        error = np.linalg.norm(q @ result.transform[:, :2].T + result.transform[:, 2] - c, axis=1)
        assert np.all(error <= 2.0)  # the default threshold of a 200 x 200 photo
        # The true map agrees with the inliers too (they are right, not just consistent).
        true_error = np.linalg.norm(q @ truth[:, :2].T + truth[:, 2] - c, axis=1)
        assert np.mean(true_error <= 2.0) >= 0.95


def test_attacked_copy_verifies_with_the_right_transform(photo_features):
    # Crop 60 %, rotate 20 deg, JPEG quality 15: the retrieval attack of the README.
    photo = _photos()[0]
    crop = photo[20:140, 10:130]
    rotation = cv2.getRotationMatrix2D((60, 60), 20, 1.0)
    rotated = cv2.warpAffine(crop, rotation, (120, 120))
    ok, jpeg = cv2.imencode(".jpg", rotated, [cv2.IMWRITE_JPEG_QUALITY, 15])
    attacked = SIFT(root=True).transform([cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)])[0]
    result = spatial_score(photo_features["original"][0], attacked)
    assert result.n_inliers >= 15  # measured 23 of 27 matches
    truth = rotation @ np.array([[1, 0, -10], [0, 1, -20], [0, 0, 1.0]])
    pairs = result.matches[result.inliers]
    q = photo_features["original"][0].positions[pairs[:, 0]]
    c = attacked.positions[pairs[:, 1]]
    assert np.mean(np.linalg.norm(q @ truth[:, :2].T + truth[:, 2] - c, axis=1) <= 3) >= 0.9


@pytest.mark.parametrize("model", ["similarity", "affine"])
def test_unrelated_photos_give_few_inliers(photo_features, model):
    originals, warped = photo_features["original"], photo_features[model]
    same = [spatial_score(q, c, model).n_inliers for q, c in zip(originals, warped)]
    unrelated = [
        spatial_score(originals[i], images[j], model).n_inliers
        for images in (originals, warped)
        for i in range(4) for j in range(4) if i != j
    ]
    # Measured: 0 for all these pairs, even with min_inliers at the minimal sample + 1
    # (and 0 for 110 unrelated 15-Scene pairs, README); the same photo gives 39 to 228. Chance alone reached 4 (similarity) and 5 (affine)
    # inliers, which the default min_inliers (5 and 6) reports as zero.
    assert max(unrelated) <= 6
    assert min(same) >= 30


def test_verification_is_reproducible(photo_features):
    query, candidate = photo_features["original"][2], photo_features["affine"][2]
    first = spatial_score(query, candidate, "affine")
    cv2.setRNGSeed(12345)  # whatever OpenCV's generator drew before
    cv2.randu(np.zeros((10, 10), np.float32), 0, 1)
    again = spatial_score(query, candidate, "affine")
    assert first.n_inliers == again.n_inliers
    np.testing.assert_array_equal(first.inliers, again.inliers)
    np.testing.assert_array_equal(first.transform, again.transform)


# -- zero results -----------------------------------------------------------------------


def _assert_zero(result):
    assert isinstance(result, Verification)
    assert result.n_inliers == 0 and result.transform is None
    assert result.inliers.shape == (0,) and result.inliers.dtype == np.int64


def _grid(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 200, (n, 2))


def _zero_cases():
    rng = np.random.default_rng(1)
    points = _grid(30)
    moved = points @ np.array([[0.9, -0.2], [0.2, 0.9]]).T + [5, 7]  # a similarity
    pairs = np.stack([np.arange(30), np.arange(30)], axis=1)
    t = np.linspace(0, 150, 30)
    line = np.stack([t + 10, 0.5 * t + 20], axis=1)
    jittered = line + rng.uniform(-0.2, 0.2, line.shape)  # collinear within the threshold
    return {
        "no matches": (points, moved, np.zeros((0, 2), np.int64), {}),
        "no keypoints": (np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2), np.int64), {}),
        "fewer than min_matches": (points, moved, pairs[:9], {"min_matches": 10}),
        "fewer than min_inliers": (points, moved, pairs[:4], {}),
        "identical query points": (np.full((30, 2), 50.0), moved, pairs, {}),
        "identical candidate points": (points, np.full((30, 2), 50.0), pairs, {}),
        "all the same match": (points, moved, np.zeros((30, 2), np.int64), {}),
        "collinear": (line, line @ np.array([[0.9, -0.2], [0.2, 0.9]]).T + 3, pairs, {}),
        "nearly collinear": (jittered, jittered * 1.1 + 4, pairs, {}),
        "scale 1/20": (points, points / 20 + 3, pairs, {}),
        "scale 20": (points, points * 20, pairs, {}),
        "random matches": (points, rng.uniform(0, 200, (30, 2)), pairs, {}),
    }


@pytest.mark.parametrize("model", ["similarity", "affine"])
@pytest.mark.parametrize("case", list(_zero_cases()))
def test_degenerate_input_gives_a_clean_zero_result(case, model):
    query_xy, candidate_xy, matches, kwargs = _zero_cases()[case]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        result = verify(query_xy, candidate_xy, matches, model, **kwargs)
    _assert_zero(result)


def test_the_same_points_do_verify():
    # The control for the zero cases: a plain similarity of spread-out points verifies.
    query_xy, candidate_xy, matches, _ = _zero_cases()["identical query points"]
    query_xy = _grid(30)
    for model in ("similarity", "affine"):
        result = verify(query_xy, candidate_xy, matches, model)
        assert result.n_inliers == 30
        np.testing.assert_allclose(result.transform, [[0.9, -0.2, 5], [0.2, 0.9, 7]], atol=1e-4)


def _planted(n_inliers, n_outliers, truth, seed=0):
    """(query_xy, candidate_xy, matches): ``n_inliers`` matches that ``truth`` maps exactly
    (points on a circle of radius 80, never near one line), then ``n_outliers`` random
    ones it misses by 40 to 90 px, so that any threshold of a few pixels splits them."""
    rng = np.random.default_rng(seed)
    angle = 2 * np.pi * np.arange(n_inliers) / n_inliers
    circle = 100 + 80 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    query = np.concatenate([circle, rng.uniform(0, 200, (n_outliers, 2))])
    candidate = query @ truth[:, :2].T + truth[:, 2]
    direction = rng.uniform(0, 2 * np.pi, n_outliers)
    miss = rng.uniform(40, 90, n_outliers)[:, None] * np.stack([np.cos(direction), np.sin(direction)], axis=1)
    candidate[n_inliers:] += miss
    pairs = np.stack([np.arange(len(query))] * 2, axis=1)
    return query, candidate, pairs


@pytest.mark.parametrize("model, truth, min_inliers, default", [
    ("similarity", _SIMILARITY, None, 5),
    ("affine", _AFFINE, None, 6),
    ("similarity", _SIMILARITY, 8, 8),
    ("affine", _AFFINE, 4, 4),
])
def test_min_inliers_is_the_fewest_inliers_accepted(model, truth, min_inliers, default):
    """Exactly ``min_inliers`` inliers verify, one fewer is a zero result (the boundary,
    with enough matches that the inlier count, not ``min_matches``, decides). The default
    is the minimal sample + 3: 5 for a similarity, 6 for an affine map."""
    threshold = 2.0
    for n_inliers, verified in ((default, True), (default - 1, False)):
        query, candidate, pairs = _planted(n_inliers, 12, truth)
        # The reference: the matches the true map puts within the threshold.
        error = np.linalg.norm(query @ truth[:, :2].T + truth[:, 2] - candidate, axis=1)
        expected = np.flatnonzero(error <= threshold)
        assert len(expected) == n_inliers and len(pairs) >= default
        result = verify(query, candidate, pairs, model, threshold=threshold, min_inliers=min_inliers)
        if verified:
            assert result.n_inliers == n_inliers
            np.testing.assert_array_equal(result.inliers, expected)
            np.testing.assert_allclose(result.transform, truth, atol=1e-4)  # float32 inside OpenCV
        else:
            _assert_zero(result)


def test_mirror_and_squashing_maps_are_rejected():
    points = _grid(30)
    pairs = np.stack([np.arange(30), np.arange(30)], axis=1)
    mirrored = points * [-1, 1] + [200, 0]
    squashed = points * [1, 0.05] + 10  # affine with singular values 1 and 0.05
    _assert_zero(verify(points, mirrored, pairs, "affine"))
    _assert_zero(verify(points, squashed, pairs, "affine", threshold=0.5))
    assert verify(points, squashed, pairs, "affine", threshold=0.5, max_scale=25).n_inliers == 30


@pytest.mark.parametrize("returned", ["none", "nan", "error"])
def test_opencv_failure_gives_a_zero_result(monkeypatch, returned):
    def failing(*args, **kwargs):
        if returned == "error":
            raise cv2.error("simulated")
        return (None, None) if returned == "none" else (np.full((2, 3), np.nan), None)

    monkeypatch.setattr(cv2, "estimateAffinePartial2D", failing)
    points = _grid(30)
    pairs = np.stack([np.arange(30), np.arange(30)], axis=1)
    _assert_zero(verify(points, points + 1, pairs))


def test_spatial_score_of_empty_features():
    empty = LocalFeatures(np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32),
                          np.zeros(0, np.float32), (200, 200))
    rng = np.random.default_rng(0)
    some = LocalFeatures(rng.random((10, 128), dtype=np.float32),
                         rng.uniform(0, 200, (10, 2)).astype(np.float32),
                         np.ones(10, np.float32), (200, 200))
    for query, candidate in ((empty, some), (some, empty), (empty, empty)):
        result = spatial_score(query, candidate)
        _assert_zero(result)
        assert result.matches.shape == (0, 2)


# -- parameters -------------------------------------------------------------------------


def test_verify_rejects_malformed_input():
    points = _grid(10)
    pairs = np.stack([np.arange(10), np.arange(10)], axis=1)
    with pytest.raises(ValueError, match="model"):
        verify(points, points, pairs, "homography")
    with pytest.raises(ValueError, match="outside"):
        verify(points, points[:5], pairs)
    with pytest.raises(ValueError, match="NaN"):
        verify(np.full((10, 2), np.nan), points, pairs)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        verify(points[:, :1], points, pairs)
    with pytest.raises(ValueError, match="integer"):
        verify(points, points, pairs.astype(float))
    with pytest.raises(ValueError, match="min_inliers"):
        verify(points, points, pairs, "affine", min_inliers=3)
    with pytest.raises(ValueError, match="threshold"):
        verify(points, points, pairs, threshold=0)
    with pytest.raises(ValueError, match="confidence"):
        verify(points, points, pairs, confidence=1.0)
    with pytest.raises(TypeError, match="LocalFeatures"):
        spatial_score(points, points)


def test_default_threshold_scales_with_the_candidate_image():
    points = _grid(40)
    pairs = np.stack([np.arange(40), np.arange(40)], axis=1)
    rng = np.random.default_rng(5)
    # Errors of 4 px: mostly outliers for a 200-pixel image (threshold 2 px; measured 9 of
    # 40 fit by chance), all inliers for an 800-pixel one (8 px), whether the size is
    # given or read off the keypoints.
    angle = rng.uniform(0, 2 * np.pi, 40)
    noise = 4 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    assert verify(points, points + noise, pairs, candidate_shape=(200, 200)).n_inliers <= 20
    assert verify(points, points + noise, pairs, candidate_shape=(600, 800)).n_inliers == 40
    # Without a shape: the extent of the candidate keypoints (here ~800 px).
    assert verify(points * 4, points * 4 + noise, pairs).n_inliers == 40
