"""Property-based tests (hypothesis) of the encoders, PCA whitening, the index and the
retrieval measures.

Every property runs 200 examples (explicit ``@settings`` below, so CI runs as many). The
vocabularies are small (D = 8, K = 6), fitted once per process on a fixed sample, so an
example costs milliseconds.

Descriptor sets are drawn as up to 60 rows of moderate values (|x| <= 12, the scale of
the training data) in which any row may instead be a copy of an earlier row, exactly a
vocabulary word (a k-means centre or a GMM mean) or all zeros; the extreme-value
properties also scale the drawn rows by 10**e, e in [-30, 30].
"""

import functools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vladkit import (
    BoFEncoder,
    FisherEncoder,
    GMMVocabulary,
    KMeansVocabulary,
    LocalFeatures,
    PCAWhitening,
    SpatialPyramid,
    VectorIndex,
    VLADEncoder,
    average_precision,
    mean_average_precision,
    recall_at_k,
)

D, K = 8, 6
IMAGE_SHAPE = (64, 64)  # (height, width) of the images the positions fall in
MAX_ROWS = 60

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ fixed vocabularies


@functools.cache
def _vocabularies():
    """k-means and GMM vocabularies fitted on one fixed float32 sample (6 blobs in 8-D)."""
    rng = np.random.default_rng(0)
    blobs = rng.normal(0, 3, (K, D))
    sample = (blobs[rng.integers(0, K, 600)] + rng.normal(0, 1, (600, D))).astype(np.float32)
    kmeans = KMeansVocabulary(K, random_state=0).fit(sample)
    gmm = GMMVocabulary(K, random_state=0).fit(sample)
    train = [sample[i:i + 50] for i in range(0, 600, 50)]
    return kmeans, gmm, train


#: name -> (factory, norm the output is normalised in: "l2", "l1")
ENCODER_SPECS = {
    "bof-hard": (lambda km, gmm: BoFEncoder(vocabulary=km), "l2"),
    "bof-soft": (lambda km, gmm: BoFEncoder(vocabulary=km, assignment="soft", n_neighbors=3), "l2"),
    "bof-tfidf-hellinger": (lambda km, gmm: BoFEncoder(vocabulary=km, tf_idf=True, power=0.5), "l2"),
    "bof-l1": (lambda km, gmm: BoFEncoder(vocabulary=km, norm="l1"), "l1"),
    "vlad-hard": (lambda km, gmm: VLADEncoder(vocabulary=km), "l2"),
    "vlad-hard-plain": (lambda km, gmm: VLADEncoder(vocabulary=km, power=None, intra_norm=False), "l2"),
    "vlad-knn": (lambda km, gmm: VLADEncoder(vocabulary=km, assignment="knn", n_neighbors=3), "l2"),
    "vlad-knn-mass-plain": (lambda km, gmm: VLADEncoder(vocabulary=km, assignment="knn", n_neighbors=3,
                                                        normalize_mass=True, power=None,
                                                        intra_norm=False), "l2"),
    "vlad-soft": (lambda km, gmm: VLADEncoder(vocabulary=km, assignment="soft"), "l2"),
    "vlad-soft-plain": (lambda km, gmm: VLADEncoder(vocabulary=km, assignment="soft", power=None,
                                                    intra_norm=False), "l2"),
    "fisher": (lambda km, gmm: FisherEncoder(vocabulary=gmm), "l2"),
    "fisher-fast": (lambda km, gmm: FisherEncoder(vocabulary=gmm, fast=True), "l2"),
    "fisher-weights": (lambda km, gmm: FisherEncoder(vocabulary=gmm, include_weights=True), "l2"),
    "spm-vlad": (lambda km, gmm: SpatialPyramid(VLADEncoder(vocabulary=km), levels=((1, 1), (2, 2))), "l2"),
    "spm-fisher": (lambda km, gmm: SpatialPyramid(FisherEncoder(vocabulary=gmm), levels=((1, 1), (1, 3))),
                   "l2"),
}
ENCODERS = list(ENCODER_SPECS)
#: Encoders whose output is exactly zero when every descriptor is a k-means centre (hard
#: assignment: every residual is 0); all others give a non-zero vector for any non-empty set.
ZERO_AT_CENTRES = {"vlad-hard", "vlad-hard-plain", "spm-vlad"}


@functools.cache
def fitted(name):
    kmeans, gmm, train = _vocabularies()
    factory, _ = ENCODER_SPECS[name]
    return factory(kmeans, gmm).fit(train)


@functools.cache
def _words():
    """The rows a drawn descriptor can be set to exactly: k-means centres, then GMM means."""
    kmeans, gmm, _ = _vocabularies()
    return np.concatenate([kmeans.centers_, gmm.means_]).astype(np.float64)


# ---------------------------------------------------------------------- strategies


@dataclass
class DescriptorSet:
    """One image: (n, D) float64 descriptors (values exactly representable in float32
    unless scaled), their (n, 2) positions, and whether every row is a k-means centre."""

    X: np.ndarray
    positions: np.ndarray
    all_centres: bool

    def __len__(self):
        return len(self.X)

    def as_input(self, name, dtype=np.float64, order=None):
        """What encoder ``name`` takes: the array, or LocalFeatures for a spatial pyramid."""
        X, positions = self.X, self.positions
        if order is not None:
            X, positions = X[order], positions[order]
        X = np.ascontiguousarray(X, dtype=dtype)
        if not name.startswith("spm"):
            return X
        return LocalFeatures(X, np.ascontiguousarray(positions), np.ones(len(X), np.float32), IMAGE_SHAPE)


STYLES = ("uniform", "blobs", "integers")
FRACTIONS = st.sampled_from([0.0, 0.1, 0.5, 1.0])


@st.composite
def descriptor_sets(draw, scaled=False, min_rows=0, max_rows=MAX_ROWS):
    """A descriptor set of n rows (n in [min_rows, max_rows]).

    Hypothesis draws the structure: n, the style of the values ("uniform" in [-12, 12],
    "blobs" around the vocabulary words as the training data, or small "integers"), the
    fractions of rows that are copies of earlier rows, exactly vocabulary words (k-means
    centres and GMM means) or zeros, the scale 10**e (e in [-30, 30] when ``scaled``) of
    the other rows, and whether positions lie on cell boundaries. The values themselves
    come from a numpy generator seeded by hypothesis: drawing 480 floats one by one costs
    ~10 ms per example, which 200 examples of ~100 properties cannot afford.
    """
    n = draw(st.integers(min_rows, max_rows))
    style = draw(st.sampled_from(STYLES))
    copies, words, zeros = draw(FRACTIONS), draw(FRACTIONS), draw(FRACTIONS)
    exponent = draw(st.integers(-30, 30)) if scaled else 0
    grid = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocabulary = _words()
    if style == "uniform":
        X = rng.uniform(-12, 12, (n, D))
    elif style == "blobs":
        X = vocabulary[rng.integers(0, len(vocabulary), n)] + rng.normal(0, 1, (n, D))
    else:
        X = rng.integers(-3, 4, (n, D)).astype(np.float64)
    X = X.astype(np.float32).astype(np.float64) * 10.0**exponent
    kinds = rng.random((3, n)) < np.array([[copies], [words], [zeros]])
    for i in range(n):
        if kinds[0, i] and i > 0:
            X[i] = X[rng.integers(0, i)]
        if kinds[1, i]:
            X[i] = vocabulary[rng.integers(0, len(vocabulary))]
        if kinds[2, i]:
            X[i] = 0
    if grid:  # on the cell boundaries of every level (and on the far edges)
        positions = rng.integers(0, 13, (n, 2)) * (IMAGE_SHAPE[0] / 12)
    else:
        positions = rng.uniform(0, IMAGE_SHAPE[0], (n, 2))
    centres = vocabulary[:K]
    all_centres = bool(n) and all((row == centres).all(axis=1).any() for row in X)
    return DescriptorSet(X, positions.astype(np.float32), all_centres)


DTYPES = st.sampled_from([np.float32, np.float64])


# ------------------------------------------------------------------------ helpers


def encode(name, sets, dtype=np.float64):
    return fitted(name).transform([s.as_input(name, dtype) for s in sets])


def assert_normalised(name, vectors, sets):
    """Finite; zero for an empty set (and for hard VLAD of centres only); else norm 1."""
    assert np.all(np.isfinite(vectors)), f"{name}: NaN or inf in the output"
    _, norm = ENCODER_SPECS[name]
    for vector, descriptors in zip(vectors, sets):
        if len(descriptors) == 0 or (name in ZERO_AT_CENTRES and descriptors.all_centres):
            assert not vector.any(), f"{name}: expected a zero vector"
            continue
        vector = vector.astype(np.float64)
        length = np.abs(vector).sum() if norm == "l1" else np.sqrt(vector @ vector)
        assert abs(length - 1) <= 1e-5, f"{name}: {norm} norm {length} for a non-empty set"


# ------------------------------------------------------------------ encoder properties


@pytest.mark.parametrize("name", ENCODERS)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_invariant_to_descriptor_order(name, data, dtype):
    descriptors = data.draw(descriptor_sets(), label="descriptors")
    order = data.draw(st.permutations(range(len(descriptors))), label="order")
    encoder = fitted(name)
    original = encoder.transform([descriptors.as_input(name, dtype)])
    permuted = encoder.transform([descriptors.as_input(name, dtype, order=np.array(order, dtype=np.int64))])
    np.testing.assert_allclose(permuted, original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ENCODERS)
@PROPERTY
@given(descriptors=descriptor_sets(), dtype=DTYPES)
def test_output_is_finite_and_normalised(name, descriptors, dtype):
    vectors = encode(name, [descriptors], dtype)
    assert vectors.shape == (1, fitted(name).n_features_out_) and vectors.dtype == np.float32
    assert_normalised(name, vectors, [descriptors])


@pytest.mark.parametrize("name", ENCODERS)
@PROPERTY
@given(descriptors=descriptor_sets())
def test_float32_agrees_with_float64(name, descriptors):
    # The same values (all exactly representable in float32) in both dtypes.
    X32 = descriptors.X.astype(np.float32)
    descriptors = DescriptorSet(X32.astype(np.float64), descriptors.positions, descriptors.all_centres)
    single = encode(name, [descriptors], np.float32)
    double = encode(name, [descriptors], np.float64)
    np.testing.assert_allclose(single, double, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ENCODERS)
@PROPERTY
@given(batch=st.lists(descriptor_sets(max_rows=30), min_size=2, max_size=6), dtype=DTYPES)
def test_batch_equals_images_one_by_one(name, batch, dtype):
    together = encode(name, batch, dtype)
    assert together.shape == (len(batch), fitted(name).n_features_out_)
    for descriptors, row in zip(batch, together):
        np.testing.assert_allclose(encode(name, [descriptors], dtype)[0], row, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ENCODERS)
@PROPERTY
@given(descriptors=descriptor_sets(scaled=True), dtype=DTYPES)
def test_extreme_values_give_finite_normalised_output(name, descriptors, dtype):
    vectors = encode(name, [descriptors], dtype)
    assert_normalised(name, vectors, [descriptors])


# ------------------------------------------------------------- whitening and the index


VECTOR_DIM = 32


@functools.cache
def _training_vectors():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, VECTOR_DIM)) * np.linspace(2, 0.2, VECTOR_DIM)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@functools.cache
def whitening(variant):
    options = {"full": {}, "partial-power": {"whiten": 0.25, "power": 0.5}}[variant]
    return PCAWhitening(16, **options).fit(_training_vectors())


@st.composite
def vector_rows(draw, max_rows=20, min_rows=0):
    """(n, VECTOR_DIM) float64 rows: moderate values times 10**e (e in [-30, 30]), some
    rows zero or equal to a training vector."""
    n = draw(st.integers(min_rows, max_rows))
    X = draw(hnp.arrays(np.float64, (n, VECTOR_DIM), elements=st.floats(-2.0, 2.0, width=32)))
    X *= 10.0 ** draw(st.integers(-30, 30))
    kinds = draw(hnp.arrays(np.int8, n, elements=st.integers(0, 2)))
    references = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 299)))
    X[kinds == 1] = 0
    X[kinds == 2] = _training_vectors()[references[kinds == 2]]
    return X


@pytest.mark.parametrize("variant", ["full", "partial-power"])
@PROPERTY
@given(X=vector_rows(), dtype=DTYPES)
def test_whitening_output_finite_and_normalised(variant, X, dtype):
    out = whitening(variant).transform(X.astype(dtype))
    assert out.shape == (len(X), 16) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    zero = ~X.astype(np.float32).any(axis=1)
    assert not out[zero].any()
    # A non-zero row projects to zero only if it is the training mean (not drawn here).
    np.testing.assert_allclose(norms[~zero], 1.0, rtol=0, atol=1e-5)


@functools.cache
def _index(kind):
    """Indexes of the 300 (unit) training vectors and two zero rows."""
    database = np.concatenate([_training_vectors(), np.zeros((2, VECTOR_DIM))])
    ids = [f"v{i}" for i in range(len(database))]
    if kind == "flat":
        index = VectorIndex("flat")
    elif kind == "flat-whitened":
        index = VectorIndex("flat", whitening=whitening("full"))
    else:  # ivfpq over whitened vectors
        index = VectorIndex("ivfpq", pq="4x4", nlist=4, nprobe=2, whitening=whitening("partial-power"))
        index.train(database)
    return index.add(database, ids)


def _check_search(index, queries, k):
    scores, ids = index.search(queries, k=k)
    assert scores.shape == (len(queries), min(k, len(index)))
    assert np.all(np.isfinite(scores)), "NaN or inf scores"
    assert np.all(np.diff(scores, axis=1) <= 0), "scores not in decreasing order"
    assert all(len(row) == scores.shape[1] and len(set(row)) == len(row) for row in ids)
    return scores


@pytest.mark.parametrize("kind", ["flat", "flat-whitened", "ivfpq-whitened"])
@PROPERTY
@given(queries=vector_rows(), k=st.integers(1, 400), dtype=DTYPES)
def test_index_search_scores_finite(kind, queries, k, dtype):
    """Unit (and zero) database vectors; queries of any scale, zero rows included."""
    scores = _check_search(_index(kind), queries.astype(dtype), k)
    if kind != "flat":  # whitened queries and vectors are unit (or zero) vectors
        assert np.all(np.abs(scores) <= 1 + 1e-3)


# ----------------------------------------------------------------- retrieval measures


@st.composite
def ranked_queries(draw, n_ids=30):
    """(ranking, positives, ignore): a ranking of distinct ids (possibly truncated and
    holding ids that are in no ground truth), non-empty positives outside ``ignore``."""
    ids = list(range(n_ids))
    ranking = draw(st.permutations(ids))
    ranking = ranking[:draw(st.integers(0, n_ids))]
    ignore = draw(st.sets(st.sampled_from(ids), max_size=5))
    positives = draw(st.sets(st.sampled_from([i for i in ids if i not in ignore]), min_size=1, max_size=10))
    return ranking, positives, ignore


@PROPERTY
@given(query=ranked_queries())
def test_average_precision_in_unit_interval(query):
    ranking, positives, ignore = query
    ap = average_precision(ranking, positives, ignore)
    assert np.isfinite(ap) and 0 <= ap <= 1
    # The perfect ranking (the positives first) scores 1.
    rest = [i for i in ranking if i not in positives]
    assert average_precision(sorted(positives) + rest, positives, ignore) == pytest.approx(1.0)


@PROPERTY
@given(queries=st.lists(ranked_queries(), min_size=1, max_size=6))
def test_mean_average_precision_and_recall_in_unit_interval(queries):
    rankings = {f"q{j}": ranking for j, (ranking, _, _) in enumerate(queries)}
    positives = {f"q{j}": positives for j, (_, positives, _) in enumerate(queries)}
    ignore = {f"q{j}": ignore for j, (_, _, ignore) in enumerate(queries)}
    from vladkit import GroundTruth

    truth = GroundTruth(positives=positives, ignore=ignore)
    value = mean_average_precision(rankings, truth)
    assert np.isfinite(value) and 0 <= value <= 1
    aps = [average_precision(*query) for query in queries]
    assert value == pytest.approx(np.mean(aps))
    recalls = recall_at_k(rankings, truth, k=(1, 5, 100))
    assert all(0 <= r <= 1 for r in recalls.values())
    assert recalls[1] <= recalls[5] <= recalls[100]
