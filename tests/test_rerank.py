"""Spatial re-ranking (vladkit.retrieval.rerank): the feature store, the re-ranked order, the CLI."""

from __future__ import annotations

import glob
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from vladkit import SIFT, LocalFeatures
from vladkit.app.cli import main
from vladkit.retrieval.rerank import FeatureStore, quantize, rerank, write_feature_store


SCENE15 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scene15")


def _photos(folder, n):
    """n real photos (15-Scene test/, one per class in turn): verification needs real
    structure, which synthetic textures lack (they give ~20 SIFT keypoints)."""
    by_class = [sorted(glob.glob(os.path.join(d, "*.jpg"))) for d in sorted(glob.glob(os.path.join(SCENE15, "test", "*")))]
    if not by_class:
        pytest.skip(f"15-Scene is not at {os.path.abspath(SCENE15)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"photo_{i:02d}.jpg")
        shutil.copyfile(by_class[i % len(by_class)][i // len(by_class)], paths[-1])
    return paths


def _attacked(path, out, degrees=12, scale=0.8, crop=0.75):
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    h, w = image.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    warped = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
    top, left = int(h * (1 - crop) / 2), int(w * (1 - crop) / 2)
    cv2.imwrite(str(out), warped[top:h - top, left:w - left])
    return out


def test_quantize_errs_at_most_half_a_step_of_the_row_maximum():
    rng = np.random.default_rng(0)
    x = rng.random((50, 128)).astype(np.float32) ** 3
    x[3] = 0  # a zero row stays zero, without NaN
    q, scales = quantize(x)
    back = q.astype(np.float32) * (scales[:, None] / 255)
    assert np.all(np.abs(back - x) <= scales[:, None] / 510 + 1e-7)
    assert not back[3].any() and np.isfinite(back).all()


def test_store_round_trip(tmp_path):
    paths = _photos(tmp_path / "db", 3)
    (tmp_path / "db" / "broken.png").write_text("not an image")
    images = [str(p) for p in paths] + [str(tmp_path / "db" / "broken.png")]
    extractor = SIFT(200, root=True)
    unreadable = []
    write_feature_store(images, tmp_path, extractor, on_unreadable=lambda i, e: unreadable.append(i))
    store = FeatureStore(tmp_path)
    assert len(store) == 4 and unreadable == [3]
    assert store.extractor.get_params()["n_features"] == 200 and store.extractor.root
    for path, stored in zip(images[:3], (store[i] for i in range(3))):
        direct = extractor.transform([path])[0]
        np.testing.assert_array_equal(stored.positions, direct.positions)
        assert stored.image_shape == direct.image_shape[:2]
        bound = direct.descriptors.max(axis=1, keepdims=True) / 510 + 1e-6
        assert np.all(np.abs(stored.descriptors - direct.descriptors) <= bound)
    assert len(store[3].descriptors) == 0  # the unreadable image: no features, not an error


def test_rerank_is_a_permutation_with_verified_candidates_first(tmp_path):
    paths = _photos(tmp_path / "db", 6)
    write_feature_store([str(p) for p in paths], tmp_path, SIFT(500, root=True))
    store = FeatureStore(tmp_path)
    query = SIFT(500, root=True).transform([str(_attacked(paths[4], tmp_path / "q.png"))])[0]
    candidates = [0, 1, 2, 3, 4, 5]
    result = rerank(query, candidates, store)
    assert sorted(result.order.tolist()) == candidates
    assert result.order[0] == 4 and result.inliers[4] >= 20
    assert all(result.inliers[j] < 8 for j in candidates if j != 4)
    assert result.order[1:].tolist() == [0, 1, 2, 3, 5]  # unverified: original order kept
    empty = query.__class__(np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32),
                            np.zeros(0, np.float32), query.image_shape)
    nothing = rerank(empty, candidates, store)
    assert nothing.order.tolist() == candidates and not nothing.inliers.any()


def _planted_candidates(planted, n_query=60, n_other=30, seed=0):
    """(query, candidates): candidate i holds copies of ``planted[i]`` of the query's
    features, moved by one similarity (so exactly those verify), and ``n_other`` random
    features elsewhere. Random 128-D descriptors: a copy is its original's only close
    match, and the others rarely pass the ratio test (and then miss the map by far)."""
    rng = np.random.default_rng(seed)
    shape = (400, 400)
    query = LocalFeatures(rng.random((n_query, 128), np.float32),
                          rng.uniform(0, 400, (n_query, 2)).astype(np.float32),
                          np.ones(n_query, np.float32), shape)
    similarity = cv2.getRotationMatrix2D((200, 200), 10, 0.9) + np.array([[0, 0, 5], [0, 0, -3]])
    candidates = []
    for n in planted:
        rows = rng.choice(n_query, n, replace=False)
        moved = query.positions[rows] @ similarity[:, :2].T + similarity[:, 2]
        descriptors = np.concatenate([query.descriptors[rows], rng.random((n_other, 128), np.float32)])
        positions = np.concatenate([moved, rng.uniform(0, 400, (n_other, 2))]).astype(np.float32)
        candidates.append(LocalFeatures(descriptors, positions, np.ones(len(positions), np.float32), shape))
    return query, candidates


@pytest.mark.parametrize("min_inliers", [None, 10])
def test_verified_candidates_are_ordered_by_decreasing_inliers(min_inliers):
    # Several verified candidates, two of them tied (positions 1 and 5), and unverified
    # ones before, between and after them in the global order.
    planted = [0, 9, 3, 25, 14, 9, 0]
    query, features = _planted_candidates(planted)
    store_rows = [6, 0, 5, 1, 4, 2, 3]  # candidate position p is store row store_rows[p]
    store = [None] * len(features)  # rerank reads store[row] only: a list will do
    for position, row in enumerate(store_rows):
        store[row] = features[position]
    result = rerank(query, store_rows, store, min_inliers=min_inliers, n_jobs=2)

    # verify() reports 0 below its own default floor of 5 (a similarity), else every copy.
    np.testing.assert_array_equal(result.inliers, [n if n >= 5 else 0 for n in planted])
    # The reference: verified candidates by decreasing inliers (ties: global rank), then
    # the others in their global order.
    floor = 5 if min_inliers is None else min_inliers
    verified = sorted((p for p in range(len(planted)) if planted[p] >= floor), key=lambda p: (-planted[p], p))
    rest = [p for p in range(len(planted)) if p not in verified]
    assert result.order.tolist() == verified + rest
    assert result.order.tolist() == ([3, 4, 1, 5, 0, 2, 6] if min_inliers is None else [3, 4, 0, 1, 2, 5, 6])


def test_cli_rerank_keeps_the_ids_of_the_top_r(tmp_path, capsys):
    paths = _photos(tmp_path / "db", 12)
    query = _attacked(paths[7], tmp_path / "query.png", degrees=20, scale=0.7, crop=0.6)
    words, encodings, index = tmp_path / "w.npz", tmp_path / "e.npz", tmp_path / "idx"
    assert main(["vocab", "build", str(tmp_path / "db"), "-k", "8", "--features", "sift", "--root",
                 "-o", str(words), "-q"]) == 0
    assert main(["encode", str(tmp_path / "db"), "--vocab", str(words), "-o", str(encodings), "-q"]) == 0
    assert main(["index", "build", str(encodings), "-o", str(index), "-q", "--rerank-features"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), str(query), "--top", "10", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]["results"]
    assert main(["search", str(index), str(query), "--top", "10", "--rerank", "10", "--json"]) == 0
    reranked = json.loads(capsys.readouterr().out)[0]["results"]
    assert sorted(r["id"] for r in reranked) == sorted(r["id"] for r in plain)
    assert reranked[0]["id"] == str(paths[7]) and reranked[0]["inliers"] >= 8
    score = {r["id"]: r["score"] for r in plain}
    assert all(r["score"] == score[r["id"]] for r in reranked)  # global scores reported unchanged
    # An index without stored features says how to build one.
    assert main(["index", "build", str(encodings), "-o", str(tmp_path / "plain"), "-q"]) == 0
    assert main(["search", str(tmp_path / "plain"), str(query), "--rerank", "10"]) == 1
    assert "--rerank-features" in capsys.readouterr().err


def test_index_build_notes_dense_fisher_vectors(tmp_path, capsys):
    _photos(tmp_path / "db", 4)
    words, encodings = tmp_path / "g.npz", tmp_path / "e.npz"
    assert main(["vocab", "build", str(tmp_path / "db"), "-k", "2", "--kind", "gmm", "--pca", "8", "--step", "8",
                 "-o", str(words), "-q"]) == 0
    assert main(["encode", str(tmp_path / "db"), "--vocab", str(words), "-o", str(encodings), "-q"]) == 0
    capsys.readouterr()
    assert main(["index", "build", str(encodings), "-o", str(tmp_path / "idx"), "-q"]) == 0
    assert "sparse RootSIFT" in capsys.readouterr().err
