"""Property-based tests (hypothesis) of the encoders, PCA whitening, the index and the
retrieval measures.

Every property runs 200 examples (explicit ``@settings``, so CI runs as many). The
vocabularies are small (D = 8, K = 6) and fitted once per process on a fixed sample, and
each example goes through all 20 encoder configurations, so an example costs a few
milliseconds and each configuration sees the 200 examples of every property.

Descriptor sets (see :func:`descriptor_sets`) hold up to 60 rows of moderate values (the
scale of the training data), any of which may instead be a copy of an earlier row, exactly
a vocabulary word (a k-means centre or a GMM mean) or zeros; the extreme-value property
also scales the other rows by 10**e, e in [-30, 30].

The bugs these properties found (softmax cut-off at large scores, the ||x||^2 term in
soft-assignment distances, float32 overflow in Fisher vectors, cancellation in soft VLAD,
float32 underflow of knn weights, overflow in the index) are fixed; the ``test_fixed_*``
tests keep them so.
"""

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from vladkit import (
    BoFEncoder,
    FisherEncoder,
    GMMVocabulary,
    GroundTruth,
    KMeansVocabulary,
    LLCEncoder,
    LocalFeatures,
    PCAWhitening,
    SpatialPyramid,
    SuperVectorEncoder,
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
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


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


@dataclass(frozen=True)
class Spec:
    factory: object  # (kmeans, gmm) -> unfitted encoder
    norm: str = "l2"  # the norm of the output: "l2" or "l1"
    power: bool = True  # a signed square root comes before the normalisation


SPECS = {
    "bof-hard": Spec(lambda km, gmm: BoFEncoder(vocabulary=km), power=False),
    "bof-soft": Spec(lambda km, gmm: BoFEncoder(vocabulary=km, assignment="soft", n_neighbors=3),
                     power=False),
    "bof-tfidf-hellinger": Spec(lambda km, gmm: BoFEncoder(vocabulary=km, tf_idf=True, power=0.5)),
    "bof-l1": Spec(lambda km, gmm: BoFEncoder(vocabulary=km, norm="l1"), norm="l1", power=False),
    "vlad-hard": Spec(lambda km, gmm: VLADEncoder(vocabulary=km)),
    "vlad-hard-plain": Spec(lambda km, gmm: VLADEncoder(vocabulary=km, power=None, intra_norm=False),
                            power=False),
    "vlad-knn": Spec(lambda km, gmm: VLADEncoder(vocabulary=km, assignment="knn", n_neighbors=3)),
    "vlad-knn-mass-plain": Spec(lambda km, gmm: VLADEncoder(
        vocabulary=km, assignment="knn", n_neighbors=3, normalize_mass=True, power=None,
        intra_norm=False), power=False),
    "vlad-soft": Spec(lambda km, gmm: VLADEncoder(vocabulary=km, assignment="soft")),
    "vlad-soft-plain": Spec(lambda km, gmm: VLADEncoder(vocabulary=km, assignment="soft", power=None,
                                                        intra_norm=False), power=False),
    "fisher": Spec(lambda km, gmm: FisherEncoder(vocabulary=gmm)),
    "fisher-fast": Spec(lambda km, gmm: FisherEncoder(vocabulary=gmm, fast=True)),
    "fisher-weights": Spec(lambda km, gmm: FisherEncoder(vocabulary=gmm, include_weights=True)),
    "spm-vlad": Spec(lambda km, gmm: SpatialPyramid(VLADEncoder(vocabulary=km), levels=((1, 1), (2, 2)))),
    "spm-fisher": Spec(lambda km, gmm: SpatialPyramid(FisherEncoder(vocabulary=gmm),
                                                      levels=((1, 1), (1, 3)))),
    "llc": Spec(lambda km, gmm: LLCEncoder(vocabulary=km, n_neighbors=3), power=False),
    "llc-sum": Spec(lambda km, gmm: LLCEncoder(vocabulary=km, pooling="sum"), power=False),
    "sv": Spec(lambda km, gmm: SuperVectorEncoder(vocabulary=km), power=False),
    "sv-soft": Spec(lambda km, gmm: SuperVectorEncoder(vocabulary=km, assignment="soft", n_neighbors=3),
                    power=False),
    "spm-llc": Spec(lambda km, gmm: SpatialPyramid(LLCEncoder(vocabulary=km, n_neighbors=3, l2=False),
                                                   levels=((1, 1), (2, 2))), power=False),
}
#: Encoders with hard assignments (nearest word, most probable component), and LLC (its
#: words are ranked and its codes solved in float64 from the same values). The others'
#: soft weights exp(-alpha d) and posteriors come from differences of products that grow
#: with |x|: in float32 the exponent is off by ~6e-8 alpha |x| |c|, a relative error of the
#: weights that float64 does not have, so float32 and float64 are compared on moderate
#: values only (|x| <= MODERATE: at most ~1e-6), beyond which it is inherent to float32.
HARD = {"bof-hard", "bof-tfidf-hellinger", "bof-l1", "vlad-hard", "vlad-hard-plain", "fisher-fast", "spm-vlad",
        "llc", "llc-sum", "sv", "spm-llc"}
MODERATE = 20.0
#: Encoders whose output is exactly zero when every descriptor is a k-means centre (hard
#: assignment: every residual is 0); the others encode any non-empty set as a non-zero vector.
ZERO_AT_CENTRES = {"vlad-hard", "vlad-hard-plain", "spm-vlad"}


@functools.cache
def fitted(name):
    kmeans, gmm, train = _vocabularies()
    return SPECS[name].factory(kmeans, gmm).fit(train)


@functools.cache
def _words():
    """The rows a drawn descriptor can be set to exactly: k-means centres, then GMM means."""
    kmeans, gmm, _ = _vocabularies()
    return np.concatenate([kmeans.centers_, gmm.means_]).astype(np.float64)


def _underflowing_weight(name, descriptors):
    """Some descriptor's multiple-assignment weight is below float32's smallest numbers."""
    encoder = fitted(name)
    Q = _knn_weights(descriptors.X, encoder.vocabulary_.centers_, encoder.n_neighbors, encoder.alpha_)
    return bool(np.any((Q > 0) & (Q < 1e-30)))


# ---------------------------------------------------------------------- strategies


@dataclass
class DescriptorSet:
    """One image: (n, D) float64 descriptors (values exactly representable in float32),
    their (n, 2) positions, and facts about the rows."""

    X: np.ndarray
    positions: np.ndarray

    def __post_init__(self):
        centres = _words()[:K]
        at_centre = [(row == centres).all(axis=1).any() for row in self.X]
        self.all_centres = bool(len(self.X)) and all(at_centre)
        self.magnitude = float(np.abs(self.X).max()) if self.X.size else 0.0

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
    ~10 ms per example, which 200 examples of ~30 properties cannot afford.
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
    # Values exactly representable in float32, before and after scaling.
    X = (X.astype(np.float32).astype(np.float64) * 10.0**exponent).astype(np.float32).astype(np.float64)
    kinds = rng.random((3, n)) < np.array([[copies], [words], [zeros]])
    for i in range(n):
        if kinds[0, i] and i > 0:
            X[i] = X[rng.integers(0, i)]
        if kinds[1, i]:
            X[i] = vocabulary[rng.integers(0, len(vocabulary))]
        if kinds[2, i]:
            X[i] = 0
    if grid:  # on the cell boundaries of every level (and on the far edges)
        # (cells are cut on pixel edges, half a pixel before the centres' coordinates)
        positions = rng.integers(0, 13, (n, 2)) * (IMAGE_SHAPE[0] / 12) - 0.5
    else:
        positions = rng.uniform(0, IMAGE_SHAPE[0], (n, 2))
    return DescriptorSet(X, positions.astype(np.float32))


DTYPES = st.sampled_from([np.float32, np.float64])


# ------------------------------------------------------------------------ helpers


def encode(name, sets, dtype=np.float64):
    return fitted(name).transform([s.as_input(name, dtype) for s in sets])


def assert_normalised(name, vector, descriptors):
    """Finite; zero for an empty set (and for hard VLAD of centres only); else norm 1."""
    assert np.all(np.isfinite(vector)), f"{name}: NaN or inf in the output"
    if len(descriptors) == 0 or (name in ZERO_AT_CENTRES and descriptors.all_centres):
        assert not vector.any(), f"{name}: expected a zero vector"
        return
    vector = vector.astype(np.float64)
    norm = SPECS[name].norm
    length = np.abs(vector).sum() if norm == "l1" else np.sqrt(vector @ vector)
    assert abs(length - 1) <= 1e-5, f"{name}: {norm} norm {length} for a non-empty set"


def unpowered(name, vector):
    """sign(v) v^2 for an encoder that ends with a signed square root and a normalisation,
    else v: near 0 the square root turns a round-off d into sqrt(d), so float32 results
    are compared before it (as in test_encoders)."""
    vector = np.asarray(vector, np.float64)
    return np.sign(vector) * vector**2 if SPECS[name].power else vector


def assert_close(name, actual, desired, atol, what):
    np.testing.assert_allclose(unpowered(name, actual), unpowered(name, desired), rtol=0, atol=atol,
                               err_msg=f"{name}: {what}")


def float32_atol(name):
    """Tolerance of float32 against float64 (on sign(v) v^2 for square-rooted encodings)."""
    return 1e-5 if SPECS[name].power else 1e-4


def reference_encoding(name, X):
    """The numpy reference (tests/reference.py) of a non-pyramid encoder, in float64, with
    the words' distances taken as ||c||^2 - 2 x.c in extended precision: the distances
    themselves (reference.squared_distances) lose the differences between words to
    ||x||^2 beyond |x| ~ 1e15, and reference.knn_weights underflows to 0 / 0."""
    encoder = fitted(name)
    if name.startswith("fisher"):
        vocabulary = encoder.vocabulary_
        return ref.fisher(X, vocabulary.means_, vocabulary.covariances_, vocabulary.weights_,
                          fast=encoder.fast, include_weights=encoder.include_weights)
    centers = encoder.vocabulary_.centers_
    if name.startswith("llc"):
        return ref.llc(X, centers, encoder.n_neighbors, encoder.beta, encoder.pooling, encoder.l2,
                       distances=_relative_distances(X, centers))
    if name.startswith("sv"):
        if encoder.assignment == "hard":
            Q = _hard_weights(X, centers)
        else:
            Q = _knn_weights(X, centers, encoder.n_neighbors, 0.5 / encoder.sigma_**2)
        return ref.supervector(X, centers, Q, encoder.s, encoder.l2)
    if name.startswith("bof"):
        if encoder.assignment == "hard":
            weights = _hard_weights
        else:
            weights = functools.partial(_knn_weights, n_neighbors=encoder.n_neighbors,
                                        alpha=0.5 / encoder.sigma_**2)
        return ref.bof(X, centers.astype(np.float64), weights, encoder.idf_, encoder.power, encoder.norm)
    if encoder.assignment == "hard":
        Q = _hard_weights(X, centers)
    elif encoder.assignment == "knn":
        Q = _knn_weights(X, centers, encoder.n_neighbors, encoder.alpha_)
    else:
        Q = _soft_weights(X, centers, encoder.alpha_)
    return _vlad_reference(X, centers.astype(np.float64), Q, encoder.normalize_mass, encoder.power,
                           encoder.intra_norm, encoder.l2)


def _vlad_reference(X, centers, Q, normalize_mass, power, intra_norm, l2):
    """reference.vlad with the residuals summed as sum_i q_ik (x_i - c_k): its
    sum_i q_ik x_i - m_k c_k is round-off for a word that descriptors sit on exactly, which
    the normalisations then scale up to a unit block."""
    residuals = np.einsum("ik,ikd->kd", Q, X[:, None, :] - centers[None])
    if normalize_mass:
        mass = Q.sum(axis=0)
        residuals /= np.where(mass > 0, mass, 1.0)[:, None]
    return ref.normalize(residuals.ravel(), power, len(centers) if intra_norm else 0, l2)


def _relative_distances(X, centers):
    """||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c, (n, K), in long double."""
    X, centers = np.asarray(X, np.longdouble), np.asarray(centers, np.longdouble)
    return (centers**2).sum(axis=1)[None, :] - 2 * X @ centers.T


def _hard_weights(X, centers):
    d = _relative_distances(X, centers)
    Q = np.zeros(d.shape)
    Q[np.arange(len(X)), d.argmin(axis=1)] = 1
    return Q


def _knn_weights(X, centers, n_neighbors, alpha):
    d = _relative_distances(X, centers)
    Q = np.zeros(d.shape)
    for i in range(len(X)):
        nearest = np.argsort(d[i], kind="stable")[:n_neighbors]
        w = np.exp(-np.longdouble(alpha) * (d[i, nearest] - d[i, nearest[0]]))
        w /= w.sum()
        w[w < np.finfo(np.float32).tiny] = 0  # vladkit's rule: both precisions drop them
        Q[i, nearest] = w
    return Q


def _soft_weights(X, centers, alpha):
    s = -np.longdouble(alpha) * _relative_distances(X, centers)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float64)


# ------------------------------------------------------------------ encoder properties
#
# Each example goes through every encoder (the failure message names the one that fails):
# 200 examples per encoder and property, without paying hypothesis' overhead 20 times.


@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_invariant_to_descriptor_order(data, dtype):
    """Permuting the descriptors (and their positions) does not change the encoding,
    beyond the round-off of summing in another order."""
    descriptors = data.draw(descriptor_sets(), label="descriptors")
    order = np.array(data.draw(st.permutations(range(len(descriptors))), label="order"), dtype=np.int64)
    for name in SPECS:
        original = fitted(name).transform([descriptors.as_input(name, dtype)])[0]
        permuted = fitted(name).transform([descriptors.as_input(name, dtype, order=order)])[0]
        assert_close(name, permuted, original, 1e-5, "order changed it")


@PROPERTY
@given(descriptors=descriptor_sets(), dtype=DTYPES)
def test_output_is_finite_and_normalised(descriptors, dtype):
    for name in SPECS:
        vectors = encode(name, [descriptors], dtype)
        assert vectors.shape == (1, fitted(name).n_features_out_) and vectors.dtype == np.float32
        assert_normalised(name, vectors[0], descriptors)


@PROPERTY
@given(descriptors=descriptor_sets())
def test_float32_agrees_with_float64(descriptors):
    """The same (float32) values given as float32 or float64 encode alike, to float32's
    precision: 1e-4 on normalised vectors, 1e-5 on sign(v) v^2 for square-rooted ones."""
    for name in SPECS:
        single = encode(name, [descriptors], np.float32)[0]
        double = encode(name, [descriptors], np.float64)[0]
        assert_close(name, single, double, float32_atol(name), "float32 != float64")


@PROPERTY
@given(batch=st.lists(descriptor_sets(max_rows=30), min_size=2, max_size=4), dtype=DTYPES)
def test_batch_equals_images_one_by_one(batch, dtype):
    """Encoding images together or one at a time gives the same vectors, up to BLAS
    rounding a row differently at another place of a matrix: in float32 that moves
    e.g. Fisher posteriors (float32 log-densities) by ~1e-5, the vector by up to ~2e-6."""
    for name in SPECS:
        together = encode(name, batch, dtype)
        assert together.shape == (len(batch), fitted(name).n_features_out_)
        for descriptors, row in zip(batch, together):
            alone = encode(name, [descriptors], dtype)[0]
            assert_close(name, row, alone, 1e-6 if dtype is np.float64 else 1e-5, "batch != alone")


@PROPERTY
@given(descriptors=descriptor_sets(scaled=True))
def test_extreme_values(descriptors):
    """Rows scaled by 10**e (e in [-30, 30]) among duplicates, words and zeros: finite and
    normalised in float32 and float64, float64 equal to the numpy reference, and float32
    equal to float64 (hard assignments; soft ones on moderate values, see HARD)."""
    for name in SPECS:
        double = encode(name, [descriptors], np.float64)[0]
        assert_normalised(name, double, descriptors)
        if not name.startswith("spm"):
            expected = reference_encoding(name, descriptors.X)
            assert_close(name, double, expected, 1e-6, "differs from tests/reference.py")
        single = encode(name, [descriptors], np.float32)[0]
        assert_normalised(name, single, descriptors)
        if name in HARD or descriptors.magnitude <= MODERATE:
            assert_close(name, single, double, float32_atol(name), "float32 != float64")


# ------------------------------------------------------------------ the fixed bugs


def _uniform(n, scale, seed=0):
    return np.random.default_rng(seed).uniform(-12, 12, (n, D)) * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixed_fisher_of_large_descriptors_is_zero(dtype):
    vector = fitted("fisher").transform([_uniform(5, 1e8).astype(dtype)])[0]
    assert np.linalg.norm(vector) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["bof-soft", "vlad-knn", "vlad-knn-mass-plain", "vlad-soft", "vlad-soft-plain"])
@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e7), (np.float32, 1e20), (np.float64, 1e16)])
def test_fixed_soft_assignment_of_large_descriptors(name, dtype, scale):
    X = _uniform(5, scale).astype(np.float32).astype(np.float64)
    vector = fitted(name).transform([X.astype(dtype)])[0]
    assert_close(name, vector, reference_encoding(name, X), 1e-5, "differs from tests/reference.py")


@pytest.mark.parametrize("name", ["fisher", "fisher-fast", "fisher-weights"])
def test_fixed_fisher_of_huge_float32_descriptors(name):
    X = _uniform(5, 1e20).astype(np.float32)
    vector = fitted(name).transform([X])[0]
    assert np.all(np.isfinite(vector))
    assert_close(name, vector, reference_encoding(name, X.astype(np.float64)), 1e-5, "differs from the reference")


def test_fixed_soft_vlad_float32_cancellation():
    X = (fitted("vlad-soft").vocabulary_.centers_[[4]] + 1e-4).astype(np.float32).astype(np.float64)  # near word 4
    single = fitted("vlad-soft").transform([X.astype(np.float32)])[0]
    double = fitted("vlad-soft").transform([X])[0]
    assert_close("vlad-soft", single, double, 1e-5, "float32 != float64")


def test_fixed_mass_normalised_vlad_of_underflowing_weights():
    name = "vlad-knn-mass-plain"
    candidates = (_uniform(1, scale, seed).astype(np.float32).astype(np.float64)
                  for seed in range(100) for scale in (4, 8, 16))
    X = next(X for X in candidates if _underflowing_weight(name, DescriptorSet(X, np.zeros((1, 2), np.float32))))
    single = fitted(name).transform([X.astype(np.float32)])[0]
    double = fitted(name).transform([X])[0]
    assert_close(name, single, double, 1e-4, "float32 != float64")


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
    """(n, VECTOR_DIM) float64 rows: normal values times 10**e (e in [-30, 30]), with
    fractions of the rows zero or equal to a training vector (seeded as descriptor_sets)."""
    n = draw(st.integers(min_rows, max_rows))
    exponent = draw(st.integers(-30, 30))
    zeros, training = draw(FRACTIONS), draw(FRACTIONS)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = rng.normal(0, 1, (n, VECTOR_DIM)) * 10.0**exponent
    kinds = rng.random((2, n)) < np.array([[training], [zeros]])
    X[kinds[0]] = _training_vectors()[rng.integers(0, 300, kinds[0].sum())]
    X[kinds[1]] = 0
    return X


@PROPERTY
@given(X=vector_rows(), dtype=DTYPES)
def test_whitening_output_finite_and_normalised(X, dtype):
    zero = ~X.astype(np.float32).any(axis=1)
    for variant in ("full", "partial-power"):
        out = whitening(variant).transform(X.astype(dtype))
        assert out.shape == (len(X), 16) and out.dtype == np.float32
        assert np.all(np.isfinite(out)), variant
        assert not out[zero].any(), variant
        # A non-zero row projects to zero only if it is the training mean (never drawn here).
        norms = np.linalg.norm(out[~zero].astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-5, err_msg=variant)


@functools.cache
def _index(kind):
    """An index of the 300 (unit) training vectors and two zero rows."""
    database = np.concatenate([_training_vectors(), np.zeros((2, VECTOR_DIM))])
    if kind == "flat":
        index = VectorIndex("flat")
    elif kind == "flat-whitened":
        index = VectorIndex("flat", whitening=whitening("full"))
    else:
        index = VectorIndex("ivfpq", pq="4x4", nlist=4, nprobe=2, whitening=whitening("partial-power"))
        index.train(database)
    return index.add(database, [f"v{i}" for i in range(len(database))])


def _check_search(index, queries, k):
    scores, ids = index.search(queries, k=k)
    assert scores.shape == (len(queries), min(k, len(index)))
    assert np.all(np.isfinite(scores)), "NaN or inf scores"
    assert np.all(np.diff(scores, axis=1) <= 0), "scores not in decreasing order"
    assert all(len(row) == scores.shape[1] and len(set(row)) == len(row) for row in ids)
    return scores


def test_index_search_scores_finite():
    """Unit (and zero) database vectors; queries of any scale, zero rows included."""
    # One OpenMP thread for faiss: its threads spin between the many tiny searches, which
    # on a busy machine makes each one ~50 times slower.
    with threadpool_limits(limits=1, user_api="openmp"):
        _index_search_scores_finite()


@PROPERTY
@given(queries=vector_rows(max_rows=8), k=st.integers(1, 400), dtype=DTYPES)
def _index_search_scores_finite(queries, k, dtype):
    for kind in ("flat", "flat-whitened", "ivfpq-whitened"):
        if kind == "flat" and np.linalg.norm(queries.astype(dtype).astype(np.float64), axis=1).max(initial=0) > 1e18:
            # float32 inner products could overflow: refused, not answered with inf / NaN
            with pytest.raises(ValueError, match="L2-normalise"):
                _index(kind).search(queries.astype(dtype), k)
            continue
        scores = _check_search(_index(kind), queries.astype(dtype), k)
        if kind == "flat-whitened":  # cosine similarities of unit (or zero) vectors
            assert np.all(np.abs(scores) <= 1 + 1e-5)


@pytest.mark.parametrize("scale", [1e19, 1e20])
def test_unnormalised_huge_vectors_are_refused_by_the_index(scale):
    # float32 inner products of vectors of norm ~1e19 would overflow (inf or NaN scores).
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="L2-normalise"):
        VectorIndex("flat").add(rng.normal(size=(10, VECTOR_DIM)) * scale, [str(i) for i in range(10)])


# ----------------------------------------------------------------- retrieval measures


@st.composite
def ranked_queries(draw, n_ids=20):
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
@given(queries=st.lists(ranked_queries(), min_size=1, max_size=4))
def test_mean_average_precision_and_recall_in_unit_interval(queries):
    names = [f"q{j}" for j in range(len(queries))]
    rankings = {q: ranking for q, (ranking, _, _) in zip(names, queries)}
    truth = GroundTruth(positives={q: positives for q, (_, positives, _) in zip(names, queries)},
                        ignore={q: ignore for q, (_, _, ignore) in zip(names, queries)})
    value = mean_average_precision(rankings, truth)
    assert np.isfinite(value) and 0 <= value <= 1
    assert value == pytest.approx(np.mean([average_precision(*query) for query in queries]))
    recalls = recall_at_k(rankings, truth, k=(1, 5, 100))
    assert all(0 <= r <= 1 for r in recalls.values())
    assert recalls[1] <= recalls[5] <= recalls[100]
