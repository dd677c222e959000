"""SMK / SMK* (no aggregation) and Hamming embedding with burstiness: the encoder and the
index against a slow numpy reference of the formulas written here
(``../shared/reference/asmk-semantics.md``). The package ``asmk`` 0.1.1 always
aggregates (its ``ASMKKernel.aggregate_image``), so it is no peer for these."""

import numpy as np
import pytest

from vladkit import KMeansVocabulary, SMKEncoder, SMKIndex
from vladkit.encoders.asmk import WordSignatures

K, D = 24, 64


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(K, D)).astype(np.float32)
    sets = []
    for n in rng.integers(1, 30, size=20):
        rows = centers[rng.integers(0, K, size=n)] + 0.4 * rng.normal(size=(n, D))
        sets.append(rows.astype(np.float32))
    vocabulary = KMeansVocabulary(K, random_state=0).fit(sets)
    queries = [s[: max(1, len(s) // 2)] + np.float32(0.05) for s in sets[:6]]
    return sets, queries, vocabulary


# ------------------------------------------------------------------ numpy reference

def reference_entries(X, centers, m, kind, projection=None, medians=None):
    """[(word, signature)] of one image, one per descriptor and each of its m nearest
    words: SMK r / ||r||, SMK* [r > 0], HE [P x > m_c]."""
    X64 = X.astype(np.float64)
    distances = ((X64[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :m]
    out = []
    for i, x in enumerate(X):
        for word in nearest[i]:
            r = (x - centers[word]).astype(np.float64)
            if kind == "smk":
                norm = np.linalg.norm(r)
                out.append((int(word), r / norm if norm > 0 else r))
            elif kind == "smk*":
                out.append((int(word), r > 0))
            else:
                out.append((int(word), (projection @ x) > medians[word]))
    return sorted(out, key=lambda e: e[0])


def reference_scores(query, database, kind, alpha=3.0, tau=0.0, idf=False, burstiness=False, h_t=24, sigma=16.0):
    """K(q, x) for every database image, from the definitions, pair by pair."""
    n = len(database)
    holders = {}
    for image in database:
        for word in {w for w, _ in image}:
            holders[word] = holders.get(word, 0) + 1
    weight = {w: (np.log(n / c) ** 2 if idf else 1.0) for w, c in holders.items()}

    def f(a, b):
        if kind == "he":
            h = np.count_nonzero(a != b)
            return np.exp(-h * h / sigma ** 2) if h <= h_t else 0.0
        u = float(a @ b) if kind == "smk" else 1 - 2 * np.count_nonzero(a != b) / len(a)
        return np.sign(u) * abs(u) ** alpha if u >= tau else 0.0

    def self_norm(image):
        if kind == "he":  # COLMAP: each descriptor with itself only
            return sum(weight.get(w, 1.0) * f(s, s) for w, s in image)
        return sum(weight.get(w, 1.0) * f(s, t) for w, s in image for v, t in image if v == w)

    q_norm = self_norm(query)
    scores = np.zeros(n)
    for x, image in enumerate(database):
        x_norm = self_norm(image)
        total = 0.0
        for w, s in query:
            terms = [f(s, t) for v, t in image if v == w]
            votes = sum(term != 0 for term in terms)
            total += weight.get(w, 1.0) * sum(terms) / (np.sqrt(votes) if burstiness and votes else 1.0)
        if q_norm > 0 and x_norm > 0:
            scores[x] = total / np.sqrt(q_norm * x_norm)
    return scores


def _entries(item, kind, bits):
    if kind == "smk":
        return [(int(w), s.astype(np.float64)) for w, s in zip(item.words, item.signatures)]
    unpacked = np.unpackbits(item.signatures, axis=1)[:, :bits].astype(bool)
    return [(int(w), b) for w, b in zip(item.words, unpacked)]


def _encoder(vocabulary, kind, sets, n_bits=64, **kw):
    return SMKEncoder(vocabulary, binary=kind != "smk", hamming=kind == "he", n_bits=n_bits, random_state=3,
                      **kw).fit(sets)


def _check_scores(index, encoder, kind, sets, queries, **ref):
    database = encoder.transform(sets)
    index.add(database, [f"im{i}" for i in range(len(sets))])
    query_sets = encoder.transform_queries(queries)
    scores, ids = index.search(query_sets, k=len(sets))
    bits = encoder.n_bits if kind == "he" else D
    db = [_entries(item, kind, bits) for item in database]
    for query, got_scores, got_ids in zip(query_sets, scores, ids):
        expected = reference_scores(_entries(query, kind, bits), db, kind, **ref)
        by_id = dict(zip(got_ids, got_scores))
        np.testing.assert_allclose([by_id[f"im{i}"] for i in range(len(sets))], expected, rtol=1e-5, atol=1e-7)
        assert np.all(np.isfinite(got_scores))
        if ref.get("tau", 0.0) >= 0:  # (negative sums rank above the untouched images' 0, as ASMKIndex's)
            assert np.all(np.diff(got_scores) <= 0)
    return scores, ids


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("kind", ["smk", "smk*", "he"])
@pytest.mark.parametrize("m", [1, 3])
def test_entries_match_the_formulas(data, kind, m):
    sets, queries, vocabulary = data
    encoder = _encoder(vocabulary, kind, sets, multiple_assignment=m)
    centers = vocabulary.centers_.astype(np.float32)
    # Queries, not the training sets: a training descriptor's code has bits exactly at
    # the median, where BLAS's rounding and the reference's may differ.
    for X, item in zip(queries, encoder.transform(queries)):
        expected = reference_entries(X, centers, m, kind, encoder.projection_, encoder.he_medians_)
        got = _entries(item, kind, 64 if kind == "he" else D)
        assert len(item) == len(X) * m and np.all(np.diff(item.words) >= 0)
        assert [w for w, _ in got] == [w for w, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            if kind == "smk":
                np.testing.assert_allclose(a, b, atol=1e-6)
            else:
                assert np.array_equal(a, b)


def test_hamming_projection_is_orthonormal_and_medians_split_training_data(data):
    sets, _, vocabulary = data
    encoder = _encoder(vocabulary, "he", sets)
    P = encoder.projection_
    np.testing.assert_allclose(P @ P.T, np.eye(64), atol=1e-5)
    assert encoder.he_medians_.shape == (K, 64)
    with pytest.raises(ValueError, match="n_bits"):
        SMKEncoder(vocabulary, hamming=True, n_bits=12).fit(sets)
    with pytest.raises(ValueError, match="give X"):
        SMKEncoder(vocabulary, hamming=True).fit()


@pytest.mark.parametrize("kind", ["smk", "smk*"])
@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_smk_scores_match_the_kernel_definition(data, kind, idf, m):
    sets, queries, vocabulary = data
    encoder = _encoder(vocabulary, kind, sets, query_assignment=m)
    _, ids = _check_scores(SMKIndex(idf=idf), encoder, kind, sets, queries, idf=idf)
    assert [row[0] for row in ids] == [f"im{i}" for i in range(len(queries))]


@pytest.mark.parametrize("idf", [False, True])
@pytest.mark.parametrize("burstiness", [False, True])
@pytest.mark.parametrize("n_bits, h_t, sigma", [(64, 24, 16.0), (16, 5, 4.0)])  # 64 bits at a time; bytes
def test_hamming_embedding_scores_match_colmaps_weighting(data, idf, burstiness, n_bits, h_t, sigma):
    sets, queries, vocabulary = data
    encoder = _encoder(vocabulary, "he", sets, n_bits=n_bits, query_assignment=2)
    index = SMKIndex(hamming=True, idf=idf, burstiness=burstiness, max_distance=h_t, sigma=sigma)
    _, ids = _check_scores(index, encoder, "he", sets, queries, idf=idf, burstiness=burstiness, h_t=h_t,
                           sigma=sigma)
    assert [row[0] for row in ids] == [f"im{i}" for i in range(len(queries))]


def test_burstiness_and_thresholds_on_smk(data):
    sets, queries, vocabulary = data
    encoder = _encoder(vocabulary, "smk", sets)
    for alpha, tau in [(1.0, -1.0), (3.0, 0.2)]:
        _check_scores(SMKIndex(alpha=alpha, threshold=tau, burstiness=True), encoder, "smk", sets, queries[:2],
                      alpha=alpha, tau=tau, burstiness=True)


@pytest.mark.parametrize("kind", ["smk", "smk*", "he"])
def test_edge_cases_give_defined_results(data, kind):
    sets, _, vocabulary = data
    encoder = _encoder(vocabulary, kind, sets, query_assignment=1)
    empty = np.zeros((0, D), np.float32)
    identical = np.repeat(sets[0][:1], 5, axis=0)               # one word, five equal entries
    on_a_word = vocabulary.centers_[:1].astype(np.float32)     # one entry, residual 0
    images = [sets[0], empty, identical, on_a_word, sets[1]]
    index = SMKIndex(hamming=kind == "he", idf=True)
    scores, ids = _check_scores(index, encoder, kind, images, [identical, empty, on_a_word, sets[0][:1]],
                                idf=True)
    assert encoder.transform([empty])[0].signatures.shape[0] == 0
    assert np.all(scores[1] == 0)                                # a query without descriptors
    by_id = dict(zip(ids[0], scores[0]))
    assert by_id["im1"] == 0                                      # an image without descriptors
    if kind != "he":  # identical descriptors: SMK's all-pairs gamma makes it 1
        np.testing.assert_allclose(by_id["im2"], 1.0, rtol=1e-6)
    else:             # COLMAP's per-descriptor gamma: 5 x 5 pairs over 5 -> 5
        np.testing.assert_allclose(by_id["im2"], 5.0, rtol=1e-6)


def test_repeated_words_are_accepted_and_order_checked(data):
    sets, _, vocabulary = data
    signatures = np.zeros((3, D // 8), np.uint8)
    index = SMKIndex().add([WordSignatures(np.array([2, 2, 5]), signatures)], ["a"])
    assert index.search([WordSignatures(np.array([2]), signatures[:1])], k=1)[0][0, 0] > 0
    with pytest.raises(ValueError, match="non-decreasing"):
        index.add([WordSignatures(np.array([5, 2, 2]), signatures)], ["b"])
    with pytest.raises(NotImplementedError):
        index.save("unused")
    with pytest.raises(ValueError, match="binary"):
        SMKIndex(hamming=True).add([WordSignatures(np.array([1]), np.zeros((1, D), np.float32))], ["c"])
