"""ASMKEncoder's options: the exact assignment against a float64 brute force (whole and
query-sized batches, float32 and float64 rows), ``binarize="median"`` (the MATLAB
original's per-word medians) against a slow numpy reference written here, and
``quantizer="hnsw"`` against the exact words."""

import pickle

import numpy as np
import pytest

from vladkit import KMeansVocabulary
from vladkit.encoders.asmk import SMALL_ROWS, ASMKEncoder

K, D = 64, 24


def _data(seed=0, n_images=30, max_rows=60):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(K, D)).astype(np.float32)
    sets = []
    for n in rng.integers(1, max_rows, size=n_images):
        rows = centers[rng.integers(0, K, size=n)] + 0.5 * rng.normal(size=(n, D))
        sets.append(rows.astype(np.float32))
    return sets, KMeansVocabulary.from_centers(centers)


def brute_force_words(X, centers, m):
    """The m nearest words of each row in float64, nearest first, ties to the lower word."""
    distances = ((X.astype(np.float64)[:, None, :] - centers.astype(np.float64)[None]) ** 2).sum(-1)
    return np.argsort(distances, axis=1, kind="stable")[:, :m]


def reference_median_signatures(X, centers, medians, m):
    """{word: bits} of one image, the MATLAB original's ASMK*: per word c, the mean of the
    residuals x - q_c of the rows with c among their m nearest words, compared with t_c."""
    nearest = brute_force_words(X, centers, m)
    out = {}
    for word in np.unique(nearest):
        rows = X[(nearest == word).any(axis=1)].astype(np.float64)
        mean = (rows - centers[word]).mean(axis=0)
        out[int(word)] = (mean - medians[word], mean > medians[word])
    return out


def reference_medians(train, centers):
    """t_c: per word, the per-dimension median of x - q_c over the training rows whose
    nearest word is c (0 for a word none is nearest to)."""
    nearest = brute_force_words(train, centers, 1)[:, 0]
    medians = np.zeros(centers.shape)
    for word in range(len(centers)):
        rows = train[nearest == word]
        if len(rows):
            medians[word] = np.median(rows - centers[word], axis=0)
    return medians


@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_assignment_is_the_float64_brute_force(m, dtype):
    sets, vocabulary = _data()
    X = np.vstack(sets).astype(dtype)
    encoder = ASMKEncoder(vocabulary, multiple_assignment=m).fit()
    expected = brute_force_words(X, vocabulary.centers_, m)
    np.testing.assert_array_equal(encoder._assign(X, m), expected)  # the parallel blocks
    small = np.vstack([encoder._assign(X[i:i + 50], m) for i in range(0, len(X), 50)])  # a query's path
    np.testing.assert_array_equal(small, expected)
    assert len(X) > SMALL_ROWS


def test_flat_assignment_settles_near_ties_in_float64():
    # Rows halfway between two words: float32 products may rank either first; float64
    # decides (to the lower word on exact ties).
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(K, D)).astype(np.float32)
    X = (0.5 * (centers[:40].astype(np.float64) + centers[1:41]) + 1e-9 * rng.normal(size=(40, D)))
    encoder = ASMKEncoder(KMeansVocabulary.from_centers(centers)).fit()
    for rows in (X.astype(np.float32), X):
        for m in (1, 2):
            np.testing.assert_array_equal(encoder._assign(rows, m), brute_force_words(rows, centers, m))


def test_median_signatures_equal_the_numpy_reference():
    sets, vocabulary = _data()
    train, _ = _data(seed=5, n_images=80)
    centers = vocabulary.centers_
    encoder = ASMKEncoder(vocabulary, binarize="median", max_descriptors=10**6).fit(train)
    medians = reference_medians(np.vstack(train), centers)
    np.testing.assert_allclose(encoder.medians_, medians, rtol=1e-6, atol=1e-6)
    for m, transform in ((1, encoder.transform), (5, encoder.transform_queries)):
        for image, encoded in zip(sets, transform(sets)):
            expected = reference_median_signatures(image, centers, encoder.medians_.astype(np.float64), m)
            assert encoded.words.tolist() == sorted(expected)
            bits = np.unpackbits(encoded.signatures, axis=1)[:, :D].astype(bool)
            for word, got in zip(encoded.words.tolist(), bits):
                margin, want = expected[word]
                clear = np.abs(margin) > 1e-5  # (float32 sums: a bit at a near-zero margin may go either way)
                np.testing.assert_array_equal(got[clear], want[clear])


def test_median_differs_from_sign_and_sign_is_the_default():
    sets, vocabulary = _data()
    sign = ASMKEncoder(vocabulary).fit(sets)
    assert sign.binarize == "sign" and sign.medians_ is None
    median = ASMKEncoder(vocabulary, binarize="median").fit(sets)
    a, b = sign.transform(sets), median.transform(sets)
    assert all(x.words.tolist() == y.words.tolist() for x, y in zip(a, b))
    assert any(not np.array_equal(x.signatures, y.signatures) for x, y in zip(a, b))
    # Zero medians give the plain signs back.
    median.medians_ = np.zeros_like(median.medians_)
    for x, y in zip(a, median.transform(sets)):
        np.testing.assert_array_equal(x.signatures, y.signatures)


def test_median_needs_training_descriptors_and_binary():
    _, vocabulary = _data()
    with pytest.raises(ValueError, match="give X to fit"):
        ASMKEncoder(vocabulary, binarize="median").fit()
    with pytest.raises(ValueError, match="binary=True"):
        ASMKEncoder(vocabulary, binarize="median", binary=False).fit([np.zeros((3, D), np.float32)])
    with pytest.raises(ValueError, match="binarize"):
        ASMKEncoder(vocabulary, binarize="mean").fit()
    with pytest.raises(ValueError, match="quantizer"):
        ASMKEncoder(vocabulary, quantizer="ivf").fit()


@pytest.mark.parametrize("m", [1, 5])
def test_hnsw_words_are_nearly_the_exact_ones_and_ranked_exactly(m):
    pytest.importorskip("faiss")
    sets, vocabulary = _data()
    X = np.vstack(sets)
    exact = ASMKEncoder(vocabulary).fit()._assign(X, m)
    encoder = ASMKEncoder(vocabulary, quantizer="hnsw", ef_search=64).fit()
    approximate = encoder._assign(X, m)
    assert np.mean((approximate == exact).all(axis=1)) > 0.98
    # Whatever the graph returns is ranked in float64: distances increase along a row.
    d = ((X.astype(np.float64)[:, None, :] - vocabulary.centers_.astype(np.float64)[approximate]) ** 2).sum(-1)
    assert (np.diff(d, axis=1) >= 0).all()
    # The same words for a query's rows alone (one thread) and after pickling.
    np.testing.assert_array_equal(encoder._assign(X[:40], m), approximate[:40])
    again = pickle.loads(pickle.dumps(encoder))
    np.testing.assert_array_equal(again._assign(X, m), approximate)


def test_pickled_encoder_gives_the_same_signatures():
    sets, vocabulary = _data()
    encoder = ASMKEncoder(vocabulary, binarize="median").fit(sets)
    again = pickle.loads(pickle.dumps(encoder))
    for x, y in zip(encoder.transform_queries(sets), again.transform_queries(sets)):
        np.testing.assert_array_equal(x.words, y.words)
        np.testing.assert_array_equal(x.signatures, y.signatures)
