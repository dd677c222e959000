"""ASMK through the command line on real 15-Scene photos: encode --encoder asmk (sharded
word sets), index build (the inverted file), search, evaluate and their refusals; the
command line's results equal the API's."""

import glob
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SCENE15, cli
from vladkit import ASMKEncoder, ASMKIndex, KMeansVocabulary, load_vocabulary
from vladkit.datasets.near_duplicates import ATTACKS, attacked_copies
from vladkit.pipeline.encodings import load_encodings
from vladkit.pipeline.word_sets import ShardedWordSets, pack_entries, unpack_entries

N_GROUPS, N_QUERIES, K = 18, 6, 64


def _scene15_photos(n):
    paths = sorted(glob.glob(os.path.join(SCENE15, "train", "*", "*.jpg")))
    if not paths:
        pytest.skip(f"15-Scene is not at {os.path.abspath(SCENE15)} (CLI tests on real photos)")
    by_class = {}
    for path in paths:
        by_class.setdefault(Path(path).parent.name, []).append(path)
    classes = sorted(by_class)
    return [by_class[classes[i % len(classes)]][i // len(classes)] for i in range(n)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """18 photos, each in its own group folder; attacked copies of 6 of them as queries in
    the same group names; taken through vocab build -> encode (database and queries) ->
    index build --rerank-features once for the module."""
    root = tmp_path_factory.mktemp("asmk-cli")
    database, queries = root / "db", root / "q"
    for number, path in enumerate(_scene15_photos(N_GROUPS)):
        group = f"g{number:02d}"
        (database / group).mkdir(parents=True)
        shutil.copy(path, database / group / "photo.jpg")
        if number < N_QUERIES:
            image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
            attacks = {name: ATTACKS[name] for name in ("crop 40%", "jpeg q=8", "rotate 12°")}
            _, copy = attacked_copies(image, 1, seed=0, index=number, attacks=attacks)[0]
            (queries / group).mkdir(parents=True)
            assert cv2.imwrite(str(queries / group / "copy.png"), cv2.cvtColor(copy, cv2.COLOR_RGB2BGR))
    words, sets, query_sets, index = root / "words.npz", root / "db.asmk", root / "q.asmk", root / "db.index"
    runs = {
        "vocab": cli("vocab", "build", database, "-k", K, "--features", "sift", "--root", "-o", words, "-q"),
        "encode": cli("encode", database, "--vocab", words, "--encoder", "asmk", "-o", sets, "-q",
                      "--shard-size", 8, "--batch-size", 4),
        "queries": cli("encode", queries, "--vocab", words, "--encoder", "asmk", "--queries", "-o", query_sets, "-q"),
        "index": cli("index", "build", sets, "--rerank-features", "-o", index, "-q"),
    }
    for name, (code, _, err) in runs.items():
        assert code == 0, f"{name}: {err}"
    return {"root": root, "db": database, "q": queries, "words": words, "sets": sets, "query_sets": query_sets,
            "index": index, "runs": runs}


def _api(chain):
    """The same images through the Python API: (encoder, index, query sets)."""
    vocabulary = load_vocabulary(chain["words"])
    extractor, _ = load_encodings(chain["sets"]).recipe.build(vocabulary)
    database = sorted(str(p) for p in chain["db"].rglob("*.jpg"))
    queries = sorted(str(p) for p in chain["q"].rglob("*.png"))
    encoder = ASMKEncoder(vocabulary).fit()
    index = ASMKIndex().add(encoder.transform(extractor.transform(database)), database)
    return encoder, index, queries, encoder.transform_queries(extractor.transform(queries))


def test_encode_writes_sharded_word_sets_equal_to_the_api(chain):
    code, out, _ = chain["runs"]["encode"]
    assert "18 images" in out and "word signatures" in out and "in 3 shards" in out
    sets = load_encodings(chain["sets"])
    assert isinstance(sets, ShardedWordSets) and sets.role == "database" and sets.n_words == K
    assert sets.signature_dtype == np.uint8 and sets.signature_shape == (16,)
    encoder, _, _, _ = _api(chain)
    extractor, _ = sets.recipe.build(encoder.vocabulary_)
    expected = encoder.transform(extractor.transform(sets.ids))
    for got, want in zip(sets.word_sets(), expected):
        assert np.array_equal(got.words, want.words) and np.array_equal(got.signatures, want.signatures)
    assert load_encodings(chain["query_sets"]).role == "queries"


def test_entries_round_trip_sorted_by_word():
    from vladkit.encoders.asmk import WordSignatures

    rng = np.random.default_rng(0)
    sets = [WordSignatures(np.sort(rng.choice(50, n, replace=False)), rng.integers(0, 256, (n, 4), dtype=np.uint8))
            for n in (5, 0, 12, 1)]
    entries = pack_entries(sets, np.uint8, (4,))
    assert np.all(np.diff(entries["word"]) >= 0)
    for got, want in zip(unpack_entries(entries, len(sets)), sets):
        assert np.array_equal(got.words, want.words) and np.array_equal(got.signatures, want.signatures)


def test_search_equals_the_api_and_finds_the_copy(chain):
    encoder, index, queries, query_sets = _api(chain)
    code, out, err = cli("search", chain["index"], *queries, "--top", 5, "--json")
    assert code == 0, err
    answers = json.loads(out)
    scores, ids = index.search(query_sets, k=5)
    found = 0
    for answer, row_scores, row_ids in zip(answers, scores, ids):
        assert [r["id"] for r in answer["results"]] == row_ids
        assert np.allclose([r["score"] for r in answer["results"]], row_scores, atol=1e-6)
        found += Path(answer["query"]).parent.name == Path(row_ids[0]).parent.name
    assert found >= N_QUERIES - 1


def test_search_with_rerank(chain):
    queries = sorted(str(p) for p in chain["q"].rglob("*.png"))
    code, out, err = cli("search", chain["index"], *queries[:2], "--top", 3, "--rerank", 10, "--json")
    assert code == 0, err
    for answer in json.loads(out):
        assert "inliers" in answer["results"][0]
        assert Path(answer["query"]).parent.name == Path(answer["results"][0]["id"]).parent.name


def test_evaluate_word_set_queries(chain, tmp_path):
    code, out, err = cli("evaluate", chain["index"], chain["query_sets"], "--ground-truth", "folders",
                         "--query-root", chain["q"], "--database-root", chain["db"], "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["queries"] == N_QUERIES and result["recall@1"] >= (N_QUERIES - 1) / N_QUERIES
    # Queries encoded as images to index (one word a descriptor): searched, with a note.
    plain = tmp_path / "plain.asmk"
    assert cli("encode", chain["q"], "--vocab", chain["words"], "--encoder", "asmk", "-o", plain, "-q")[0] == 0
    code, out, err = cli("evaluate", chain["index"], plain, "--ground-truth", "folders", "--json",
                         "--query-root", chain["q"], "--database-root", chain["db"])
    assert code == 0 and "encoded as images to index" in err and json.loads(out)["queries"] == N_QUERIES


def test_index_build_options_and_refusals(chain, tmp_path):
    code, _, err = cli("index", "build", chain["sets"], "--pca", 8, "-o", tmp_path / "x")
    assert code == 2 and "act on vectors" in err
    code, _, err = cli("index", "build", chain["query_sets"], "-o", tmp_path / "x")
    assert code == 1 and "encoded as queries" in err
    code, _, err = cli("index", "build", chain["sets"], "--threshold", 2, "-o", tmp_path / "x")
    assert code != 0 and "threshold" in err
    assert not (tmp_path / "x").exists()
    # Another codebook: the vocabulary that encoded the sets is checked by content.
    other = tmp_path / "other.npz"
    assert cli("vocab", "build", chain["db"], "-k", 16, "--features", "sift", "--root", "-o", other, "-q")[0] == 0
    code, _, err = cli("index", "build", chain["sets"], "--vocab", other, "-o", tmp_path / "x")
    assert code == 1 and str(other) in err and "not the vocabulary" in err
    code, out, err = cli("index", "build", chain["sets"], "--idf", "--alpha", 2, "-o", tmp_path / "idf", "-q")
    assert code == 0, err
    params = json.loads((tmp_path / "idf" / "metadata.json").read_text())["params"]
    assert params == {"alpha": 2.0, "threshold": 0.0, "idf": True}


def test_encode_refusals(chain, tmp_path):
    code, _, err = cli("encode", chain["db"], "--vocab", chain["words"], "--encoder", "asmk", "-o", tmp_path / "a.npz")
    assert code == 2 and "folder of shards" in err
    code, _, err = cli("encode", chain["db"], "--vocab", chain["words"], "--queries", "-o", tmp_path / "v")
    assert code == 2 and "--encoder asmk" in err
    # A vocabulary whose dimension differs from the descriptors'.
    other = tmp_path / "pca64.npz"
    KMeansVocabulary(8, random_state=0).fit(np.random.default_rng(0).random((200, 64), np.float32)).save(other)
    code, _, err = cli("encode", chain["db"], "--vocab", other, "--encoder", "asmk", "--features", "sift",
                       "-o", tmp_path / "d")
    assert code == 2 and "64-dimensional" in err and str(other) in err and not (tmp_path / "d").exists()


def test_evaluate_refuses_mismatched_queries(chain, tmp_path):
    vectors = tmp_path / "v.npz"
    assert cli("encode", chain["q"], "--vocab", chain["words"], "-o", vectors, "-q")[0] == 0
    code, _, err = cli("evaluate", chain["index"], vectors, "--ground-truth", "folders")
    assert code == 1 and "another encoder" in err
    floats = tmp_path / "f.asmk"
    assert cli("encode", chain["q"], "--vocab", chain["words"], "--encoder", "asmk", "--signatures", "float",
               "--queries", "-o", floats, "-q")[0] == 0
    code, _, err = cli("evaluate", chain["index"], floats, "--ground-truth", "folders")
    assert code == 1 and "another encoder" in err


def test_damaged_index_refused_naming_the_file(chain, tmp_path):
    damaged = tmp_path / "damaged.index"
    shutil.copytree(chain["index"], damaged)
    target = damaged / "entry_images.npy"
    target.write_bytes(target.read_bytes()[:-8])
    query = sorted(str(p) for p in chain["q"].rglob("*.png"))[0]
    code, _, err = cli("search", damaged, query)
    assert code == 1 and "entry_images.npy" in err


def test_encode_resumes_word_sets(chain, tmp_path):
    output = tmp_path / "db.asmk"
    args = ("encode", chain["db"], "--vocab", chain["words"], "--encoder", "asmk", "-o", output, "-q",
            "--shard-size", 8, "--batch-size", 4)
    assert cli(*args)[0] == 0
    (output / "shard-000001.json").unlink()
    manifest = json.loads((output / "manifest.json").read_text())
    manifest["complete"] = False
    (output / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(*args)
    assert code == 0 and "resumed: 10 of 18" in err
    assert (output / "shard-000001.npy").read_bytes() == (chain["sets"] / "shard-000001.npy").read_bytes()


def test_serve_searches_an_asmk_index(chain):
    from vladkit.app.serve.service import SearchService

    service = SearchService(chain["index"])
    info = service.info()
    assert info["kind"] == "asmk*" and info["images"] == N_GROUPS and info["words"] == K
    assert info["bytes_per_image"] > 0 and info["rerank"]
    encoder, index, queries, query_sets = _api(chain)
    _, ids = index.search(query_sets[:1], k=3)
    answer = service.search_image(Path(queries[0]).read_bytes(), top=3)
    assert [r["id"] for r in answer["results"]] == ids[0]
    reranked = service.search_image(Path(queries[0]).read_bytes(), top=3, rerank_depth=10)
    assert "inliers" in reranked["results"][0]
    by_id = service.search_id(ids[0][0], top=1)
    assert by_id["results"][0]["id"] == ids[0][0]


def test_encode_word_sets_on_dask_gives_the_same_bytes(chain, tmp_path):
    pytest.importorskip("distributed", reason="Dask is an optional extra: pip install 'vladkit[dask]'")
    import subprocess
    import sys

    output = tmp_path / "dask.asmk"
    run = subprocess.run([sys.executable, "-m", "vladkit", "encode", str(chain["db"]), "--vocab", str(chain["words"]),
                          "--encoder", "asmk", "-o", str(output), "-q", "--shard-size", "8", "--batch-size", "4",
                          "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for shard in sorted(chain["sets"].glob("shard-*")):
        assert (output / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_index_build_killed_leaves_nothing_and_a_rerun_starts_clean(chain, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "killed.index"
    process = subprocess.Popen([sys.executable, "-m", "vladkit", "index", "build", str(chain["sets"]),
                                "--rerank-features", "-o", str(output), "-q"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not any(
            p.name.startswith(".killed.index.") for p in tmp_path.iterdir()):
        time.sleep(0.005)
    time.sleep(0.2)  # into the extraction of the re-ranking features
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the build ended before it could be killed"
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed.index.")]  # its scratch, left
    assert cli("index", "build", chain["sets"], "-o", output, "-q")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.index"]  # the scratch removed
    assert len(ASMKIndex.load(output)) == N_GROUPS
