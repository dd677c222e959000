"""The retrieval half of the command line (encode, index build, search, evaluate, demo),
end to end on a small generated collection, and the pieces of the demo."""

import base64
import dataclasses
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import cli
from vladkit import load_vocabulary
from vladkit.app.cli import main
from vladkit.datasets.near_duplicates import ATTACKS, demo_photos, near_duplicate_set
from vladkit.app.demo import DemoResult, format_table, write_report
from vladkit.encoders import BoFEncoder, SpatialPyramid, VLADEncoder
from vladkit.pipeline.encodings import EncodedImages, load_encodings
from vladkit.pipeline.recipe import file_sha256, parse_extractor
from vladkit.retrieval.ground_truth import folder_ground_truth
from vladkit.retrieval.metrics import mean_average_precision, recall_at_k
from vladkit.features.extractors import SIFT
from vladkit.retrieval.index import VectorIndex

K, D = 8, 128
GROUPS = 3
BROKEN = "broken.jpg"




def _variants(base):
    """Six near duplicates of one image: itself, a crop, two rescales, JPEG, blur."""
    return {
        "orig.png": base,
        "crop.png": base[12:148, 16:186],
        "small.png": cv2.resize(base, (150, 120), interpolation=cv2.INTER_AREA),
        "large.png": cv2.resize(base, (260, 208), interpolation=cv2.INTER_CUBIC),
        "jpeg.jpg": cv2.imdecode(cv2.imencode(".jpg", base, [cv2.IMWRITE_JPEG_QUALITY, 30])[1],
                                 cv2.IMREAD_GRAYSCALE),
        "blur.png": cv2.GaussianBlur(base, (0, 0), 1.0),
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A folder of 3 groups x 6 near-duplicate images (+ one broken file), taken through
    vocab build -> encode -> index build (flat, and PCA + PQ) once for the module."""
    from conftest import textured_image

    root = tmp_path_factory.mktemp("retrieval")
    folder = root / "photos"
    for g in range(GROUPS):
        group = folder / f"group{g}"
        group.mkdir(parents=True)
        for name, image in _variants(textured_image(100 + g, (160, 200))).items():
            assert cv2.imwrite(str(group / name), image)
    (folder / "group0" / BROKEN).write_text("this is text, not a JPEG\n")
    good = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name != BROKEN)
    assert len(good) == GROUPS * 6

    words, enc, idx, idxpq = root / "words.npz", root / "enc.npz", root / "idx", root / "idxpq"
    runs = {
        "vocab": cli("vocab", "build", folder, "-k", K, "--features", "sift", "--root", "-o", words, "-q"),
        "encode": cli("encode", folder, "--vocab", words, "-o", enc, "-q"),
        "index": cli("index", "build", enc, "-o", idx),
        "index_pq": cli("index", "build", enc, "--pca", 8, "--pq", "4x4", "-o", idxpq),
    }
    for name, (code, _, err) in runs.items():
        assert code == 0, f"{name}: {err}"
    return {"root": root, "folder": folder, "good": good, "broken": str(folder / "group0" / BROKEN),
            "words": words, "enc": enc, "idx": idx, "idxpq": idxpq, "runs": runs}


# ------------------------------------------------------------------- vocab + encode


def test_vocab_build_skips_the_broken_file_and_records_the_extractor(chain):
    _, out, err = chain["runs"]["vocab"]
    assert "(1 skipped)" in out and f"of {len(chain['good'])} images" in out
    assert chain["broken"] in err and "skipped" in err
    vocab = load_vocabulary(chain["words"])
    assert vocab.centers_.shape == (K, D)
    assert vocab.descriptor_type.startswith("SIFT(") and "root=True" in vocab.descriptor_type


def test_encode_writes_one_vector_per_readable_image(chain):
    _, out, err = chain["runs"]["encode"]
    skipped_lines = [line for line in err.splitlines() if line.startswith("vladkit: skipped ")]
    assert len(skipped_lines) == 1 and chain["broken"] in skipped_lines[0]
    assert "read 18 of 19 images, skipped 1" in err  # the end-of-job summary
    assert f"{len(chain['good'])} images x {K * D:,} (vlad, SIFT), 1 skipped" in out

    enc = load_encodings(chain["enc"])
    assert enc.ids == chain["good"]  # the paths, in the listing order, without the broken file
    assert enc.vectors.shape == (len(chain["good"]), K * D) and enc.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(enc.vectors, axis=1), 1.0, rtol=1e-5)
    assert [path for path, _ in enc.skipped] == [chain["broken"]]

    # The recipe: the extractor the vocabulary was built with, and the vocabulary itself.
    vocab = load_vocabulary(chain["words"])
    kind, params = parse_extractor(vocab.descriptor_type)
    assert (enc.recipe.extractor, enc.recipe.extractor_params) == (kind, params) == ("SIFT", params)
    assert params["root"] is True
    assert enc.recipe.encoder == "vlad" and enc.recipe.pyramid is None
    assert enc.recipe.vocabulary_path == str(chain["words"].resolve())
    assert enc.recipe.vocabulary_sha256 == file_sha256(chain["words"])


@pytest.mark.parametrize("options, dim", [
    ((), K * D),
    (("--encoder", "bof"), K),
    (("--pyramid",), 8 * K * D),
], ids=["vlad", "bof", "vlad-pyramid"])
def test_encode_equals_the_api(chain, tmp_path, options, dim):
    out = tmp_path / "enc.npz"
    code, _, err = cli("encode", chain["folder"], "--vocab", chain["words"], *options, "-o", out, "-q")
    assert code == 0, err
    enc = load_encodings(out)
    assert enc.vectors.shape == (len(chain["good"]), dim)
    assert enc.ids == chain["good"]

    vocabulary = load_vocabulary(chain["words"])
    features = SIFT(root=True).transform(chain["good"])
    encoder = BoFEncoder(vocabulary=vocabulary) if "bof" in options else VLADEncoder(vocabulary=vocabulary)
    if "--pyramid" in options:
        encoder = SpatialPyramid(encoder, levels=((1, 1), (2, 2), (1, 3)))
    expected = encoder.fit(features).transform(features)
    assert expected.shape == (len(chain["good"]), dim)
    np.testing.assert_array_equal(enc.vectors, expected)


# ---------------------------------------------------------------------------- index


def test_index_build_flat_and_pq(chain):
    enc = load_encodings(chain["enc"])
    n = len(enc.ids)
    assert f"wrote {chain['idx']}: {n} images, flat index of dimension {K * D}" in chain["runs"]["index"][1]
    assert "pq index of dimension 8, 2 bytes per image" in chain["runs"]["index_pq"][1]

    for folder, kind, index_dim in ((chain["idx"], "flat", K * D), (chain["idxpq"], "pq", 8)):
        index = VectorIndex.load(folder)
        assert (index.kind, len(index), index.dim, index.index_dim) == (kind, n, K * D, index_dim)
        assert index.ids == enc.ids
        # The recipe and the vocabulary travel with the index.
        assert json.loads((folder / "recipe.json").read_text()) == enc.recipe.to_json()
        assert (folder / "vocabulary.npz").read_bytes() == chain["words"].read_bytes()
    assert VectorIndex.load(chain["idxpq"]).bytes_per_vector == 2


# --------------------------------------------------------------------------- search


def test_search_finds_the_query_first(chain):
    query = chain["folder"] / "group1" / "crop.png"
    code, out, err = cli("search", chain["idx"], query, "--top", 3, "--json")
    assert code == 0, err
    answers = json.loads(out)
    assert [a["query"] for a in answers] == [str(query)]
    results = answers[0]["results"]
    assert len(results) == 3
    assert results[0]["id"] == str(query)
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # The query is encoded as the indexed images were: the scores are the inner products
    # of the stored vectors, and the rest of the top 3 are its near duplicates.
    enc = load_encodings(chain["enc"])
    scores = enc.vectors @ enc.vectors[enc.ids.index(str(query))]
    order = np.argsort(-scores, kind="stable")[:3]
    assert [r["id"] for r in results] == [enc.ids[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in results], scores[order], atol=1e-5)
    assert all("/group1/" in r["id"] for r in results)

    code, out, _ = cli("search", chain["idxpq"], query, "--top", 2)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(query) and len(lines) == 3
    assert all(re.fullmatch(rf"\s+{rank}\s+-?\d\.\d{{4}}\s+\S+", line) for rank, line in zip((1, 2), lines[1:]))
    assert all(line.split()[-1] in enc.ids for line in lines[1:])


# ------------------------------------------------------------------------- evaluate


def _brute_force(enc):
    """mAP and recall@k of the folders ground truth, ranking by numpy inner products."""
    truth = folder_ground_truth(enc.ids)
    scores = enc.vectors @ enc.vectors.T
    rows = {image: row for row, image in enumerate(enc.ids)}
    rankings = {q: [enc.ids[j] for j in np.argsort(-scores[rows[q]], kind="stable")] for q in truth}
    return truth, mean_average_precision(rankings, truth), recall_at_k(rankings, truth, k=(1, 5, 10))


def test_evaluate_matches_a_brute_force_ranking(chain):
    enc = load_encodings(chain["enc"])
    truth, expected_map, expected_recall = _brute_force(enc)
    assert len(truth) == len(enc.ids)

    code, out, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["queries"] == len(enc.ids)
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(expected_recall[k], abs=1e-12)
    # Chance (a random ranking of the 17 others, 5 of them positives) is about 0.3.
    assert result["mAP"] > 0.8 and result["recall@1"] >= 0.9

    code, out, _ = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders")
    assert code == 0
    assert f"{len(enc.ids)} queries (folders ground truth)" in out
    assert re.search(rf"^\s+mAP\s+{expected_map:.4f}$", out, re.MULTILINE), out

    code, out, err = cli("evaluate", chain["idxpq"], chain["enc"], "--ground-truth", "folders", "--json")
    assert code == 0, err
    compressed = json.loads(out)
    assert compressed["queries"] == len(enc.ids)
    assert 0.4 < compressed["mAP"] <= 1.0  # 2 bytes per image: lossy, still above chance


# ------------------------------------------------------- evaluate: held-out queries, --top


def _numpy_ap(ranked, positives, top=None):
    """Trapezoidal AP from numpy cumulative sums: precision and recall after every rank of
    the first ``top`` results, from the point (recall 0, precision 1)."""
    ranked = list(ranked)[:top]
    hits = np.array([item in positives for item in ranked], dtype=np.float64)
    found = np.cumsum(hits)
    precision = np.concatenate([[1.0], found / np.arange(1, len(ranked) + 1)])
    recall = np.concatenate([[0.0], found / len(positives)])
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _numpy_reference(queries, database, positives, itself=None, top=None, ks=(1, 5, 10)):
    """mAP and recall@k of queries (EncodedImages) against database (EncodedImages),
    ranking by numpy inner products; ``positives``: query -> its positives, written out
    by the test; ``itself``: query -> the database id removed from its ranking."""
    aps, first = [], []
    for query, relevant in positives.items():
        scores = database.vectors @ queries.vectors[queries.ids.index(query)]
        skip = (itself or {}).get(query)
        ranked = [database.ids[j] for j in np.argsort(-scores, kind="stable") if database.ids[j] != skip]
        aps.append(_numpy_ap(ranked, relevant, top))
        first.append(next((rank for rank, i in enumerate(ranked) if i in relevant), np.inf))
    return float(np.mean(aps)), {k: float(np.mean(np.array(first) < k)) for k in ks}


@pytest.fixture(scope="module")
def held_out(chain):
    """15-Scene's protocol in small, with the vocabulary of ``chain``: train/{a,b,c}/ is
    indexed, test/{a,b}/ is encoded apart as the queries. Each train class holds one image
    of another class, so that rankings are not perfect."""
    from conftest import textured_image

    root = chain["root"] / "held_out"
    bases = {name: _variants(textured_image(300 + i, (160, 200))) for i, name in enumerate("abc")}
    layout = {
        "train/a": [("a", "orig.png"), ("a", "crop.png"), ("a", "small.png"), ("b", "jpeg.jpg")],
        "train/b": [("b", "orig.png"), ("b", "crop.png"), ("b", "small.png"), ("a", "jpeg.jpg")],
        "train/c": [("c", "orig.png"), ("c", "crop.png"), ("c", "small.png"), ("c", "jpeg.jpg")],
        "test/a": [("a", "large.png"), ("a", "blur.png")],
        "test/b": [("b", "large.png"), ("b", "blur.png")],
    }
    for folder, images in layout.items():
        (root / folder).mkdir(parents=True)
        for base, name in images:
            assert cv2.imwrite(str(root / folder / f"{base}-{name}"), bases[base][name])
    train, test, idx = root / "train.npz", root / "test.npz", root / "train.index"
    for args in (("encode", root / "train", "--vocab", chain["words"], "-o", train, "-q"),
                 ("encode", root / "test", "--vocab", chain["words"], "-o", test, "-q"),
                 ("index", "build", train, "-o", idx)):
        code, _, err = cli(*args)
        assert code == 0, err
    return {"root": root, "train": train, "test": test, "idx": idx}


def _class_positives(queries, database):
    """query -> the database images of its class, the class being the parent folder's name."""
    return {q: [d for d in database.ids if Path(d).parent.name == Path(q).parent.name] for q in queries.ids}


def test_evaluate_held_out_queries(held_out):
    train, test = load_encodings(held_out["train"]), load_encodings(held_out["test"])
    assert len(train.ids) == 12 and len(test.ids) == 4 and not set(test.ids) & set(train.ids)
    positives = _class_positives(test, train)
    assert all(len(p) == 4 for p in positives.values())
    expected_map, expected_recall = _numpy_reference(test, train, positives)
    assert 0.3 < expected_map < 1.0  # a confuser in each class: not a perfect ranking

    code, out, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["queries", "mAP", "recall@1", "recall@5", "recall@10"]
    assert result["queries"] == 4
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(expected_recall[k], abs=1e-12)

    root = held_out["root"]
    code, out, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders")
    assert code == 0 and err == "", err
    assert "4 queries (folders ground truth)" in out
    assert f"groups: folders relative to {root / 'test'} (queries) and {root / 'train'} (index)" in out
    assert re.search(rf"^\s+mAP\s+{expected_map:.4f}$", out, re.MULTILINE), out

    # The roots given: the same figures; roots that do not match: a one-line failure.
    code, out, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders", "--json",
                         "--query-root", root / "test", "--database-root", root / "train")
    assert code == 0, err
    assert json.loads(out) == result
    code, _, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders",
                       "--query-root", root)
    assert code == 1
    _one_line_error(err, held_out["test"], "--query-root", "'test/a'")
    code, _, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders",
                       "--database-root", root / "test")
    assert code == 1
    _one_line_error(err, "not under the database root")


def test_evaluate_counts_indexed_images_missing_from_the_query_file_as_positives(chain, tmp_path):
    # The query file holds 2 of the 6 images of each group of the index: the 4 others are
    # positives all the same, not negatives.
    enc = load_encodings(chain["enc"])
    rows = [row for row, image in enumerate(enc.ids) if Path(image).stem in ("crop", "blur")]
    subset = tmp_path / "subset.npz"
    EncodedImages(enc.vectors[rows], [enc.ids[r] for r in rows], enc.recipe).save(subset)
    queries = load_encodings(subset)
    assert len(queries.ids) == 2 * GROUPS

    positives = {q: [d for d in enc.ids if Path(d).parent == Path(q).parent and d != q] for q in queries.ids}
    assert all(len(p) == 5 for p in positives.values())
    itself = {q: q for q in queries.ids}
    expected_map, expected_recall = _numpy_reference(queries, enc, positives, itself)
    # Positives taken from the query file only (the other query of the group) score
    # another figure: the test tells the two apart.
    from_query_file = {q: [o for o in queries.ids if Path(o).parent == Path(q).parent and o != q]
                       for q in queries.ids}
    assert abs(_numpy_reference(queries, enc, from_query_file, itself)[0] - expected_map) > 0.01

    code, out, err = cli("evaluate", chain["idx"], subset, "--ground-truth", "folders", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["queries"] == 2 * GROUPS
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(expected_recall[k], abs=1e-12)


def test_evaluate_holidays_queries_apart_from_the_index(chain, tmp_path):
    from conftest import textured_image

    a, b, c = (_variants(textured_image(400 + i, (160, 200))) for i in range(3))
    database = {"100000.png": a["orig.png"], "100001.png": a["crop.png"], "100002.png": b["small.png"],
                "100100.png": b["orig.png"], "100101.png": b["crop.png"], "flickr_7.png": c["orig.png"]}
    # 100000 is the same image as the indexed one; 100100 another view of its group.
    query_images = {"100000.png": a["orig.png"], "100100.png": b["large.png"]}
    for folder, images in (("db", database), ("queries", query_images)):
        (tmp_path / folder).mkdir()
        for name, image in images.items():
            assert cv2.imwrite(str(tmp_path / folder / name), image)
    for args in (("encode", tmp_path / "db", "--vocab", chain["words"], "-o", tmp_path / "db.npz", "-q"),
                 ("encode", tmp_path / "queries", "--vocab", chain["words"], "-o", tmp_path / "q.npz", "-q"),
                 ("index", "build", tmp_path / "db.npz", "-o", tmp_path / "db.index")):
        code, _, err = cli(*args)
        assert code == 0, err
    db, queries = load_encodings(tmp_path / "db.npz"), load_encodings(tmp_path / "q.npz")

    def indexed(name):
        return str(tmp_path / "db" / name)

    # Positives are index images (100002 is in group 1000, whatever it shows); the query's
    # own number in the index is left out of its ranking; the Flickr image is a distractor.
    q0, q1 = str(tmp_path / "queries" / "100000.png"), str(tmp_path / "queries" / "100100.png")
    positives = {q0: [indexed("100001.png"), indexed("100002.png")], q1: [indexed("100101.png")]}
    itself = {q0: indexed("100000.png"), q1: indexed("100100.png")}
    expected_map, expected_recall = _numpy_reference(queries, db, positives, itself)

    code, out, err = cli("evaluate", tmp_path / "db.index", tmp_path / "q.npz", "--ground-truth", "holidays",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["queries"] == 2
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    assert result["recall@1"] == pytest.approx(expected_recall[1], abs=1e-12)


def test_evaluate_top_is_labelled_and_bounds_k(chain, held_out):
    # recall@5 of rankings cut at 3 would be recall@3 under another name: refused.
    for k in ("5", "4"):
        code, out, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders",
                             "--top", 3, "--k", 1, k)
        assert code == 2 and out == ""
        _one_line_error(err, "--top 3", f"--k {k}")

    # Same-collection queries find themselves first: the top 3 are counted without them.
    enc = load_encodings(chain["enc"])
    positives = {q: [d for d in enc.ids if Path(d).parent == Path(q).parent and d != q] for q in enc.ids}
    itself = {q: q for q in enc.ids}
    full_map, _ = _numpy_reference(enc, enc, positives, itself)
    expected_map, expected_recall = _numpy_reference(enc, enc, positives, itself, top=3, ks=(1, 3))
    assert expected_map < full_map  # 5 positives, 3 places: AP@3 < AP
    code, out, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders", "--top", 3,
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    # The default k above --top are left out, and the AP is named for its cut.
    assert list(result) == ["queries", "mAP@3", "recall@1"]
    assert result["mAP@3"] == pytest.approx(expected_map, abs=1e-12)
    assert result["recall@1"] == pytest.approx(expected_recall[1], abs=1e-12)
    code, out, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders", "--top", 3,
                         "--k", 1, 3, "--json")
    assert code == 0, err
    assert json.loads(out)["recall@3"] == pytest.approx(expected_recall[3], abs=1e-12)
    code, out, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "folders", "--top", 3)
    assert code == 0, err
    assert re.search(rf"^\s+mAP@3\s+{expected_map:.4f}$", out, re.MULTILINE), out
    assert "AP over the top 3 results" in out and not re.search(r"^\s+mAP\s", out, re.MULTILINE)

    # Held-out queries: nothing to leave out, the top 2 are the first 2 results.
    train, test = load_encodings(held_out["train"]), load_encodings(held_out["test"])
    expected_map, expected_recall = _numpy_reference(test, train, _class_positives(test, train), top=2)
    code, out, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "folders",
                         "--top", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["queries", "mAP@2", "recall@1"]
    assert result["mAP@2"] == pytest.approx(expected_map, abs=1e-12)
    assert result["recall@1"] == pytest.approx(expected_recall[1], abs=1e-12)


def test_evaluate_refuses_queries_encoded_another_way(chain, held_out, tmp_path):
    words = tmp_path / "other-words.npz"
    test = tmp_path / "test.npz"
    for args in (("vocab", "build", held_out["root"] / "train", "-k", K, "--features", "sift", "--root",
                  "--seed", 1, "-o", words, "-q"),
                 ("encode", held_out["root"] / "test", "--vocab", words, "-o", test, "-q")):
        code, _, err = cli(*args)
        assert code == 0, err
    assert load_encodings(test).vectors.shape[1] == K * D  # same size: search would not fail
    code, _, err = cli("evaluate", held_out["idx"], test, "--ground-truth", "folders")
    assert code == 1
    _one_line_error(err, test, "vocabulary")
    code, _, err = cli("evaluate", held_out["idx"], held_out["test"], "--ground-truth", "holidays",
                       "--query-root", held_out["root"])
    assert code == 2
    _one_line_error(err, "--query-root", "folders")


# --------------------------------------------------------------------------- errors


def test_usage_errors_exit_2(chain, tmp_path):
    code, _, err = cli("encode", chain["folder"], "-o", tmp_path / "e.npz")
    assert code == 2 and "--vocab" in err
    code, _, err = cli("index", "build", chain["enc"], "--pq", "16y8", "-o", tmp_path / "i")
    assert code == 2 and "16y8" in err
    code, _, err = cli("evaluate", chain["idx"], chain["enc"], "--ground-truth", "oxford")
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def _one_line_error(err, *names):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vladkit: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)


def test_failures_exit_1_naming_the_file(chain, tmp_path):
    out = tmp_path / "out.npz"
    code, _, err = cli("encode", chain["folder"], "--vocab", chain["enc"], "-o", out, "-q")
    assert code == 1
    _one_line_error(err, chain["enc"])
    text = tmp_path / "notes.txt"
    text.write_text("no vocabulary here\n")
    code, _, err = cli("encode", chain["folder"], "--vocab", text, "-o", out, "-q")
    assert code == 1
    _one_line_error(err, text)
    assert not out.exists()

    code, _, err = cli("index", "build", chain["words"], "-o", tmp_path / "idx")
    assert code == 1
    _one_line_error(err, chain["words"])

    code, _, err = cli("search", chain["folder"], chain["good"][0])
    assert code == 1
    _one_line_error(err, chain["folder"])

    # A complete VectorIndex without the recipe of `index build` cannot encode queries.
    bare = tmp_path / "bare"
    enc = load_encodings(chain["enc"])
    VectorIndex("flat").add(enc.vectors, enc.ids).save(bare)
    code, _, err = cli("search", bare, chain["good"][0])
    assert code == 1
    _one_line_error(err, bare, "recipe.json")

    # Holidays names, but no query image (NNNN00.jpg) among them.
    holidays = tmp_path / "holidays.npz"
    EncodedImages(enc.vectors[:3], ["/h/100001.jpg", "/h/100002.jpg", "/h/100101.jpg"], enc.recipe).save(holidays)
    code, _, err = cli("evaluate", chain["idx"], holidays, "--ground-truth", "holidays")
    assert code == 1
    _one_line_error(err, holidays, "no query")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "holidays.npz", "notes.txt"]


def test_search_with_unreadable_queries(chain, tmp_path):
    missing = tmp_path / "missing.png"
    code, out, err = cli("search", chain["idx"], missing)
    assert code == 1
    _one_line_error(err, missing)

    good = chain["good"][0]
    code, out, err = cli("search", chain["idx"], chain["broken"], good, "--top", 2, "--json")
    assert code == 1  # a query failed, but the others are answered
    _one_line_error(err, chain["broken"])
    answers = json.loads(out)
    assert [a["query"] for a in answers] == [good]
    assert answers[0]["results"][0]["id"] == good


@pytest.mark.parametrize("options, message", [
    (("--pca", 100), "100"),           # more components than the 18 training vectors
    (("--pq", "5x4"), "5x4"),          # 1024 dimensions are not a multiple of 5
    (("--pq", "4x8"), "256"),          # 2**8 centroids need 256 training vectors
    (("--pca", 4, "--train", "missing.npz"), "missing.npz"),
], ids=["pca", "pq-dim", "pq-train", "train"])
def test_failed_index_build_writes_nothing(chain, tmp_path, options, message):
    options = [str(tmp_path / o) if o == "missing.npz" else o for o in options]
    code, _, err = cli("index", "build", chain["enc"], *options, "-o", tmp_path / "idx")
    assert code == 1
    _one_line_error(err, message)
    assert list(tmp_path.iterdir()) == []  # no index folder, no temporary folder


def test_index_build_refuses_a_changed_vocabulary(chain, tmp_path):
    copy = tmp_path / "words.npz"
    copy.write_bytes(chain["words"].read_bytes())
    enc = load_encodings(chain["enc"])
    recipe = dataclasses.replace(enc.recipe, vocabulary_path=str(copy))
    EncodedImages(enc.vectors, enc.ids, recipe).save(tmp_path / "enc.npz")
    copy.write_bytes(copy.read_bytes() + b"\0")  # changed since it encoded
    code, _, err = cli("index", "build", tmp_path / "enc.npz", "-o", tmp_path / "idx")
    assert code == 1
    _one_line_error(err, copy, "changed")
    assert not (tmp_path / "idx").exists()
    copy.unlink()  # gone altogether
    code, _, err = cli("index", "build", tmp_path / "enc.npz", "-o", tmp_path / "idx")
    assert code == 1 and "missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.npz"]


def test_index_build_failing_while_copying_the_vocabulary_leaves_nothing(chain, tmp_path, monkeypatch):
    # The recipe and vocabulary are written inside the index's own atomic save.
    import vladkit.retrieval.index

    write_file = vladkit.retrieval.index._write_file

    def disk_full(path, data):
        if path.endswith("vocabulary.npz"):
            raise OSError(28, "No space left on device")
        write_file(path, data)

    monkeypatch.setattr(vladkit.retrieval.index, "_write_file", disk_full)
    code, _, err = cli("index", "build", chain["enc"], "-o", tmp_path / "idx")
    assert code == 1 and "No space left" in err
    assert list(tmp_path.iterdir()) == []


def test_index_build_replaces_an_index_it_wrote(chain, tmp_path):
    out = tmp_path / "idx"
    assert cli("index", "build", chain["enc"], "-o", out)[0] == 0
    code, _, err = cli("index", "build", chain["enc"], "--pca", 8, "-o", out)
    assert code == 0, err
    assert VectorIndex.load(out).index_dim == 8
    assert sorted(p.name for p in out.iterdir()) == [
        "ids.json", "index.faiss", "metadata.json", "recipe.json", "vocabulary.npz", "whitening.npz"]


# ---------------------------------------------------------------------- demo pieces


@pytest.fixture(scope="module")
def photos():
    return demo_photos()


def test_demo_photos(photos):
    assert len(photos) >= 12
    names = [name for name, _ in photos]
    assert names == sorted(set(names))
    for name, image in photos:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert max(image.shape[:2]) <= 512 and min(image.shape[:2]) >= 64, name


def _arrays_equal(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_near_duplicate_set_is_seeded_and_structured(photos):
    chosen = photos[:3]
    data = near_duplicate_set(chosen, seed=0)
    again = near_duplicate_set(chosen, seed=0)
    other = near_duplicate_set(chosen, seed=1)

    assert [i for i, _ in data.database] == [i for i, _ in again.database]
    assert [(i, a) for i, _, a in data.queries] == [(i, a) for i, _, a in again.queries]
    assert data.ground_truth == again.ground_truth
    assert _arrays_equal([x for _, x in data.database], [x for _, x in again.database])
    assert _arrays_equal([x for _, x, _ in data.queries], [x for _, x, _ in again.queries])
    assert _arrays_equal(data.learning, again.learning)
    assert not _arrays_equal([x for _, x, _ in data.queries], [x for _, x, _ in other.queries])

    # Database: every original as is, then 3 distractors per photo.
    database = dict(data.database)
    assert len(data.database) == len(database) == 3 * (1 + 3)
    for name, photo in chosen:
        assert np.array_equal(database[name], photo)
        assert sum(i.startswith(f"{name} [distractor") for i in database) == 3
    # Queries: 7 attacks per photo, whose ground truth is the original.
    assert len(ATTACKS) == 7 and len(data.queries) == 3 * 7
    for name, _ in chosen:
        mine = [(i, attack) for i, _, attack in data.queries if i.startswith(f"{name} [")]
        assert [attack for _, attack in mine] == list(ATTACKS)
        for query, _ in mine:
            assert data.ground_truth[query] == [name]
    assert set(data.ground_truth) == {i for i, _, _ in data.queries}
    assert not set(data.ground_truth) & set(database)
    # Learning: 16 grey images per photo, none of them a database or query image.
    assert len(data.learning) == 3 * 16
    seen = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in [*database.values(), *(x for _, x, _ in data.queries)]]
    for image in data.learning:
        assert image.dtype == np.uint8 and image.ndim == 2
        assert not any(s.shape == image.shape and np.array_equal(s, image) for s in seen)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_return_uint8_rgb(photos, attack):
    grey = [name for name, image in photos if np.array_equal(image[..., 0], image[..., 2])]
    colour = [name for name, image in photos if name not in grey]
    assert grey and colour
    names = dict(photos)
    for name in (colour[0], grey[0]):  # grey photos are given as RGB too
        image = names[name][:200, :240]
        out = ATTACKS[attack](image, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, (attack, name, out.shape)
        assert min(out.shape[:2]) >= 16
        assert out.shape != image.shape or not np.array_equal(out, image)


GREEN, RED = (40, 170, 60), (210, 50, 40)


def _count(image, colour):
    return int(np.all(image == colour, axis=2).sum())


def test_write_report(photos, tmp_path):
    data = near_duplicate_set(photos[:3], distractors_per_photo=2, learning_per_photo=1, seed=0)
    database_ids = [i for i, _ in data.database]

    def rankings(original_first):
        ranked = {}
        for query, _, _ in data.queries:
            original = data.ground_truth[query][0]
            others = [i for i in database_ids if i != original]
            ranked[query] = [original, *others] if original_first else [*others, original]
        return ranked

    results = [
        DemoResult("VLAD K=64", 32768, 1.0, 1.0, 1.5, rankings(True)),
        DemoResult("VLAD K=64 + PCA-256 + PQ 16x8", 16, 0.25, 0.0, 0.25, rankings(False)),
        DemoResult("BoF <K=2>", 8, 0.125, 0.0, 0.1, rankings(True)),
    ]
    report = write_report(tmp_path / "out", results, data)
    assert report == tmp_path / "out" / "report.html"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html"]
    page = report.read_text(encoding="utf-8")
    assert "<tr><td>VLAD K=64</td><td>32,768</td><td>1.000</td><td>1.000</td><td>1.5</td></tr>" in page
    assert ("<tr><td>VLAD K=64 + PCA-256 + PQ 16x8</td><td>16</td><td>0.250</td><td>0.000</td>"
            "<td>0.2</td></tr>") in page
    assert "<td>BoF &lt;K=2&gt;</td>" in page  # escaped
    assert f"{len(data.database)} database images, {len(data.queries)} queries" in page

    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(blobs) == 2  # the plot, and the montage of queries and results
    images = []
    for blob in blobs:
        png = base64.b64decode(blob, validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.size
        images.append(image[..., ::-1])
    montage = images[1]
    # One row per attack of 96-pixel thumbnails with a 4-pixel frame; the best result of at
    # most 64 bytes per image (the PQ row) ranks the original last: no green frame in its top 5.
    assert montage.shape[0] == len(ATTACKS) * (96 + 8)
    assert _count(montage, RED) > len(ATTACKS) * 5 * 2 * 4 * 96 and _count(montage, GREEN) < 50

    # The same with the original first: the first result of each row is framed in green.
    results[1] = dataclasses.replace(results[1], rankings=rankings(True))
    montage = cv2.imdecode(np.frombuffer(base64.b64decode(re.findall(
        r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'",
        write_report(tmp_path / "out", results, data).read_text(encoding="utf-8"))[1]), np.uint8),
        cv2.IMREAD_COLOR)[..., ::-1]
    assert _count(montage, GREEN) > len(ATTACKS) * 2 * 4 * 96

    table = format_table(results).splitlines()
    assert table[0] == "| encoding | bytes / image | mAP | recall@1 |"
    assert table[2:] == ["| VLAD K=64 | 32,768 | 1.000 | 1.000 |",
                         "| VLAD K=64 + PCA-256 + PQ 16x8 | 16 | 0.250 | 0.000 |",
                         "| BoF <K=2> | 8 | 0.125 | 0.000 |"]


# ---------------------------------------------------------------------- the full demo

DEMO_ROWS = [
    ("BoF K=1000 (Hellinger)", 4000),
    ("VLAD K=64", 32768),
    ("VLAD K=64 + PCA-256", 1024),
    ("VLAD K=64 + PCA-256 + PQ 64x8", 64),
    ("VLAD K=64 + PCA-256 + PQ 16x8", 16),
    ("FV K=64 PCA-64", 32768),
    ("FV K=64 PCA-64 + PCA-256", 1024),
    ("FV K=64 PCA-64 + PCA-256 + PQ 64x8", 64),
    ("FV K=64 PCA-64 + PCA-256 + PQ 16x8", 16),
]


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # -q: no progress messages
    lines = captured.out.splitlines()
    assert lines[:2] == ["| encoding | bytes / image | mAP | recall@1 |", "|---|---:|---:|---:|"]
    rows = [line.split(" | ") for line in lines[2:2 + len(DEMO_ROWS)]]
    assert [(r[0].lstrip("| "), int(r[1].replace(",", ""))) for r in rows] == DEMO_ROWS
    for row in rows:
        mean_ap, recall = float(row[2]), float(row[3].rstrip(" |"))
        # 1 positive among ~90 database images: a random ranking scores about 0.05.
        assert 0.3 < mean_ap <= 1.0 and 0.3 < recall <= 1.0, row
    assert lines[2 + len(DEMO_ROWS)] == ""
    assert lines[-1].startswith("total ") and lines[-1].endswith(f"report: {out / 'report.html'}")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f"<tr><td>{name}</td><td>{size:,}</td>" in page for name, size in DEMO_ROWS)


def test_extractor_description_round_trips_numpy_parameters():
    from vladkit import DenseSIFT
    from vladkit.pipeline.recipe import describe_extractor, parse_extractor

    text = describe_extractor(DenseSIFT(step=np.int64(6), sizes=[np.int64(4), 8], root=True, on_error="skip"))
    assert "on_error" not in text and "np." not in text
    kind, params = parse_extractor(text)
    assert kind == "DenseSIFT" and params["step"] == 6 and params["sizes"] == (4, 8) and params["root"] is True
    assert parse_extractor("DenseSIFT(step=__import__('os'))") is None  # literals only
    assert parse_extractor("a vocabulary trained from the API") is None
