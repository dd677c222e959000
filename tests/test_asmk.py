"""ASMK / ASMK*: the encoder and the inverted file against a slow numpy reference of the
formulas (written here) and against the reference package ``asmk`` where it is installed
(``../shared/reference/asmk-semantics.md`` has its install line)."""

import os

import numpy as np
import pytest

from vladkit import KMeansVocabulary
from vladkit.encoders.asmk import ASMKEncoder, WordSignatures
from vladkit.retrieval.asmk_index import ASMKIndex
from vladkit.retrieval.index_files import IndexFileError

K, D = 48, 32


def _sets(seed=0, n_images=24, max_rows=40, centers=None):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, D)).astype(np.float32) if centers is None else centers
    sets = []
    for n in rng.integers(1, max_rows, size=n_images):
        rows = centers[rng.integers(0, K, size=n)] + 0.4 * rng.normal(size=(n, D))
        sets.append(rows.astype(np.float32))
    return sets, centers


@pytest.fixture(scope="module")
def data():
    sets, centers = _sets()
    vocabulary = KMeansVocabulary(K, random_state=0).fit(sets)
    queries = [s[: max(1, len(s) // 2)] + np.float32(0.05) for s in sets[:8]]
    return sets, queries, vocabulary


# ------------------------------------------------------------------ numpy reference

def reference_signatures(X, centers, m, binary):
    """{word: signature} of one image, from the formulas: V_c = sum of x - q_c over the
    descriptors with c among their m nearest words; binary: [V_c > 0]; else V_c / (||V_c|| + 1e-6)."""
    X64 = X.astype(np.float64)
    distances = ((X64[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :m]
    out = {}
    for word in np.unique(nearest):
        rows = X[(nearest == word).any(axis=1)]
        V = (rows - centers[word]).astype(np.float64).sum(0)
        out[int(word)] = (V > 0) if binary else V / (np.linalg.norm(V) + 1e-6)
    return out


def reference_scores(query, database, binary, alpha=3.0, tau=0.0, idf=False):
    """K(q, x) for every database image x, straight from the kernel's definition."""
    n = len(database)
    holders = {}
    for image in database:
        for word in image:
            holders[word] = holders.get(word, 0) + 1
    weight = {w: (np.log(n / c) ** 2 if idf else 1.0) for w, c in holders.items()}

    def similarity(a, b):
        u = 1 - 2 * np.count_nonzero(a != b) / len(a) if binary else float(a @ b)
        return np.sign(u) * abs(u) ** alpha if u >= tau else 0.0

    query_norm = sum(weight.get(w, 1.0) for w in query)
    scores = np.zeros(n)
    for x, image in enumerate(database):
        image_norm = sum(weight[w] for w in image)
        total = sum(weight[w] * similarity(query[w], image[w]) for w in query if w in image)
        if image_norm and query_norm:
            scores[x] = total / np.sqrt(image_norm) / np.sqrt(query_norm)
    return scores


def _as_dict(item, binary, dim):
    if binary:
        bits = np.unpackbits(item.signatures, axis=1)[:, :dim].astype(bool)
        return {int(w): b for w, b in zip(item.words, bits)}
    return {int(w): s.astype(np.float64) for w, s in zip(item.words, item.signatures)}


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("m", [1, 5])
def test_signatures_match_the_formulas(data, binary, m):
    sets, _, vocabulary = data
    encoder = ASMKEncoder(vocabulary, binary=binary, multiple_assignment=m).fit()
    centers = vocabulary.centers_.astype(np.float32)
    for X, item in zip(sets, encoder.transform(sets)):
        expected = reference_signatures(X, centers, m, binary)
        assert list(item.words) == sorted(expected)
        got = _as_dict(item, binary, D)
        for word, signature in expected.items():
            if binary:
                assert np.array_equal(got[word], signature)
            else:
                np.testing.assert_allclose(got[word], signature, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_scores_match_the_kernel_definition(data, binary, idf, m):
    sets, queries, vocabulary = data
    encoder = ASMKEncoder(vocabulary, binary=binary, multiple_assignment=1, query_assignment=m).fit()
    database = encoder.transform(sets)
    index = ASMKIndex(idf=idf).add(database, [f"im{i}" for i in range(len(sets))])
    scores, ids = index.search(encoder.transform_queries(queries), k=len(sets))
    database_dicts = [_as_dict(item, binary, D) for item in database]
    for row, (query, got_scores, got_ids) in enumerate(zip(encoder.transform_queries(queries), scores, ids)):
        expected = reference_scores(_as_dict(query, binary, D), database_dicts, binary, idf=idf)
        by_id = dict(zip(got_ids, got_scores))
        np.testing.assert_allclose([by_id[f"im{i}"] for i in range(len(sets))], expected, rtol=1e-5, atol=1e-7)
        assert np.all(np.diff(got_scores) <= 0)
        assert got_ids[0] == f"im{row}"  # a query is a part of its own image


def test_selectivity_threshold_and_alpha(data):
    sets, queries, vocabulary = data
    encoder = ASMKEncoder(vocabulary, binary=False).fit()
    database = encoder.transform(sets)
    dicts = [_as_dict(item, False, D) for item in database]
    for alpha, tau in [(1.0, -1.0), (3.0, 0.2), (5.0, 0.0)]:
        index = ASMKIndex(alpha=alpha, threshold=tau).add(database, [str(i) for i in range(len(sets))])
        query = encoder.transform_queries(queries[:1])
        scores, ids = index.search(query, k=len(sets))
        expected = reference_scores(_as_dict(query[0], False, D), dicts, False, alpha=alpha, tau=tau)
        by_id = dict(zip(ids[0], scores[0]))
        np.testing.assert_allclose([by_id[str(i)] for i in range(len(sets))], expected, rtol=1e-5, atol=1e-7)


def test_edge_cases_give_defined_results(data):
    sets, _, vocabulary = data
    encoder = ASMKEncoder(vocabulary).fit()
    empty = np.zeros((0, D), np.float32)
    identical = np.repeat(sets[0][:1], 5, axis=0)
    on_a_word = vocabulary.centers_[:1].astype(np.float32)     # residual 0: signature of zeros
    images = [sets[0], empty, identical, on_a_word, sets[1]]
    database = encoder.transform(images)
    assert len(database[1]) == 0 and database[1].signatures.shape == (0, D // 8)
    assert len(database[2]) == 1 and len(database[3]) == 1
    assert not database[3].signatures.any()
    index = ASMKIndex(idf=True).add(database, ["a", "empty", "same", "zero", "b"])
    queries = encoder.transform_queries([sets[0], empty, sets[1]])
    scores, ids = index.search(queries, k=5)
    assert np.isfinite(scores).all()
    assert ids[0][0] == "a" and ids[2][0] == "b"
    assert ids[0].index("empty") > ids[0].index("a")   # indexed, never above a match
    assert not scores[1].any() and ids[1] == ["a", "empty", "same", "zero", "b"]  # no words: zeros
    absent = WordSignatures(np.array([K + 5]), np.zeros((1, D // 8), np.uint8))   # a word no image holds
    scores, _ = index.search([absent], k=3)
    assert not scores.any()


def test_save_load_memory_mapped_and_refusals(data, tmp_path):
    sets, queries, vocabulary = data
    encoder = ASMKEncoder(vocabulary).fit()
    index = ASMKIndex(idf=True).add(encoder.transform(sets), [f"im{i}" for i in range(len(sets))])
    before = index.search(encoder.transform_queries(queries), k=10)
    folder = tmp_path / "ix"
    index.save(folder)
    loaded = ASMKIndex.load(folder)
    assert isinstance(loaded._arrays["entry_signatures"], np.memmap)
    after = loaded.search(encoder.transform_queries(queries), k=10)
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    # more images after loading: laid out again, same answers for the old ones
    loaded.add(encoder.transform(sets[:2]), ["new0", "new1"])
    assert len(loaded) == len(sets) + 2
    assert loaded.search(encoder.transform_queries(queries[:1]), k=1)[1][0][0] in ("im0", "new0")
    # a truncated array is refused, naming the file
    path = folder / "entry_signatures.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(IndexFileError, match="entry_signatures.npy"):
        ASMKIndex.load(folder)
    index.save(folder)   # an index folder is replaced
    (folder / "word_weights.npy").write_bytes((folder / "image_scales.npy").read_bytes())
    with pytest.raises(IndexFileError, match="word_weights.npy"):
        ASMKIndex.load(folder)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a vladkit index folder"):
        index.save(other)
    assert (other / "notes.txt").read_text() == "mine"


def test_signatures_of_another_encoder_are_refused(data):
    sets, _, vocabulary = data
    index = ASMKIndex().add(ASMKEncoder(vocabulary).fit().transform(sets[:3]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="another encoder"):
        index.search(ASMKEncoder(vocabulary, binary=False).fit().transform(sets[:1]))
    with pytest.raises(ValueError, match="dimension"):
        ASMKEncoder(vocabulary).fit().transform([np.zeros((3, D + 1), np.float32)])


# ------------------------------------------------------------------ the asmk package



def _peer_method(centers, binary, idf, m_db, m_query, topk):
    asmk_method = pytest.importorskip("asmk.asmk_method", reason="the asmk package is not installed")
    from asmk import codebook as codebook_module, index as index_module

    params = {"index": {"gpu_id": None}, "train_codebook": {"codebook": {"size": len(centers)}},
              "build_ivf": {"kernel": {"binary": binary}, "ivf": {"use_idf": idf},
                            "quantize": {"multiple_assignment": m_db}, "aggregate": {}},
              "query_ivf": {"quantize": {"multiple_assignment": m_query}, "aggregate": {},
                            "search": {"topk": topk},
                            "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}}}
    codebook = codebook_module.Codebook(index_module.initialize_index(None), size=len(centers))
    codebook.index(np.ascontiguousarray(centers, dtype=np.float32))
    return asmk_method.ASMKMethod(params, {}, codebook=codebook)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_scores_equal_the_asmk_packages(data, binary, idf, m):
    sets, queries, vocabulary = data
    centers = vocabulary.centers_.astype(np.float32)
    method = _peer_method(centers, binary, idf, 1, m, len(sets))
    descriptors = np.vstack(sets)
    image_ids = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    method = method.build_ivf(descriptors, image_ids)
    _, peer_queries, ranks, peer_scores = method.query_ivf(
        np.vstack(queries), np.repeat(np.arange(len(queries)), [len(q) for q in queries]))

    encoder = ASMKEncoder(vocabulary, binary=binary, query_assignment=m).fit()
    # The same quantisation as the package (faiss, float32), so that what is compared is
    # the aggregation and the kernel: float32 near-ties may rank words otherwise.
    import faiss

    flat = faiss.IndexFlatL2(D)
    flat.add(centers)
    encoder._assign = lambda X, k: flat.search(np.ascontiguousarray(X, dtype=np.float32), k)[1].astype(np.int64)
    index = ASMKIndex(idf=idf).add(encoder.transform(sets), [str(i) for i in range(len(sets))])
    scores, ids = index.search(encoder.transform_queries(queries), k=len(sets))
    for q in range(len(queries)):
        ours = dict(zip(map(int, ids[q]), scores[q]))
        theirs = dict(zip(ranks[q].tolist(), peer_scores[q]))
        np.testing.assert_allclose([ours[i] for i in range(len(sets))], [theirs[i] for i in range(len(sets))],
                                   rtol=1e-5, atol=1e-6)
        # The rankings agree except among exactly tied scores.
        order_ours = [int(i) for i in ids[q]]
        order_theirs = ranks[q].tolist()
        for a, b in zip(order_ours, order_theirs):
            assert a == b or np.isclose(ours[a], theirs[b], rtol=1e-6, atol=1e-9)


def test_exact_assignment_agrees_with_faiss_almost_everywhere(data):
    faiss = pytest.importorskip("faiss")
    sets, _, vocabulary = data
    centers = vocabulary.centers_.astype(np.float32)
    X = np.vstack(sets)
    encoder = ASMKEncoder(vocabulary, multiple_assignment=5).fit()
    ours = encoder._assign(X, 5)
    flat = faiss.IndexFlatL2(D)
    flat.add(centers)
    theirs = flat.search(X, 5)[1]
    assert np.mean(ours == theirs) > 0.999
