import itertools

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import reference as ref
from vladkit import BoFEncoder, FisherEncoder, GMMVocabulary, KMeansVocabulary, VLADEncoder
from vladkit import _vlfeat as vl

needs_vlfeat = pytest.mark.skipif(
    vl.load() is None, reason="VLFeat's libvl is not installed (apt-get install libvlfeat-dev)")

D, K = 16, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (K, D))
    centers[-1] += 50  # a word no descriptor is assigned to
    sets = []
    for n in [40, 0, 1, 300, 7]:
        labels = rng.integers(0, K - 1, n)
        sets.append((centers[labels] + 0.6 * rng.standard_normal((n, D))).astype(np.float32))
    variances = rng.uniform(0.2, 1.0, (K, D))
    weights = rng.dirichlet(np.ones(K))
    weights[2] = 1e-7  # a component VLFeat skips
    weights /= weights.sum()
    return {
        "sets": sets,
        "kmeans": ref.kmeans_vocabulary(centers.astype(np.float32)),
        "gmm": ref.gmm_vocabulary(centers.astype(np.float32), variances.astype(np.float32),
                                  weights.astype(np.float32)),
    }


def _weights(assignment, X, centers, alpha, n_neighbors=3):
    if assignment == "hard":
        return ref.hard_weights(X, centers)
    if assignment == "knn":
        return ref.knn_weights(X, centers, n_neighbors, alpha)
    return ref.soft_weights(X, centers, alpha)


VLAD_OPTIONS = list(itertools.product(["hard", "knn", "soft"], [False, True], [0.5, None], [True, False], [True, False]))


def _vlad_case(data, assignment, mass, power, intra, l2):
    vocab = data["kmeans"]
    encoder = VLADEncoder(vocabulary=vocab, assignment=assignment, n_neighbors=3, alpha=0.7,
                          normalize_mass=mass, power=power, intra_norm=intra, l2=l2)
    out = encoder.fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, K * D) and out.dtype == np.float32
    centers = vocab.centers_.astype(np.float64)
    weights = [_weights(assignment, X.astype(np.float64), centers, 0.7) for X in data["sets"]]
    return out, weights


@pytest.mark.parametrize("assignment,mass,power,intra,l2", VLAD_OPTIONS)
def test_vlad_matches_numpy_reference(data, assignment, mass, power, intra, l2):
    out, weights = _vlad_case(data, assignment, mass, power, intra, l2)
    centers = data["kmeans"].centers_.astype(np.float64)
    for X, Q, encoded in zip(data["sets"], weights, out):
        expected = ref.vlad(X.astype(np.float64), centers, Q, mass, power, intra, l2)
        _assert_float32_close(encoded, expected, power and not (intra or l2))


@needs_vlfeat
@pytest.mark.parametrize("assignment,mass,power,intra,l2", VLAD_OPTIONS)
def test_vlad_matches_vlfeat(data, assignment, mass, power, intra, l2):
    """vl_vlad_encode given the same assignment weights."""
    out, weights = _vlad_case(data, assignment, mass, power, intra, l2)
    flags = ((vl.VLAD_NORMALIZE_MASS if mass else 0) | (vl.VLAD_SQUARE_ROOT if power else 0)
             | (vl.VLAD_NORMALIZE_COMPONENTS if intra else 0) | (0 if l2 else vl.VLAD_UNNORMALIZED))
    for X, Q, encoded in zip(data["sets"], weights, out):
        if len(X):
            theirs = vl.vlad_encode(X, data["kmeans"].centers_, Q.astype(np.float32), flags)
            _assert_float32_close(encoded, theirs, power and not (intra or l2))


def _assert_float32_close(ours, theirs, square_rooted_only):
    """max |ours - theirs| <= 1e-5 for normalised vectors; for unnormalised ones (entries
    up to ~10, rounded in float32 on both sides) the bound scales with the magnitude, and a
    signed square root left unnormalised is undone first, since sqrt near 0 amplifies
    round-off (|sqrt a - sqrt b| <= sqrt |a - b|)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if square_rooted_only:
        ours, theirs = np.sign(ours) * ours**2, np.sign(theirs) * theirs**2
    scale = max(1.0, np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-5 * scale


FISHER_OPTIONS = [
    ("plain", dict(improved=False, power=None, l2=False), 0),
    ("normalized", dict(improved=False, power=None, l2=True), vl.FISHER_NORMALIZED),
    ("square-root", dict(improved=False, power=0.5, l2=False), vl.FISHER_SQUARE_ROOT),
    ("improved", dict(improved=True), vl.FISHER_IMPROVED),
    ("fast", dict(improved=False, power=None, l2=False, fast=True), vl.FISHER_FAST),
    ("fast-improved", dict(improved=True, fast=True), vl.FISHER_FAST | vl.FISHER_IMPROVED),
]


def _fisher_case(data, options):
    vocab = data["gmm"]
    out = FisherEncoder(vocabulary=vocab, **options).fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, 2 * K * D) and out.dtype == np.float32
    # The skipped component (prior < 1e-6) has zero blocks.
    assert not out[:, 2 * D:3 * D].any() and not out[:, K * D + 2 * D:K * D + 3 * D].any()
    square_rooted_only = (options.get("power") == 0.5 and not options.get("l2", True)
                          and not options.get("improved", True))
    return vocab, out, square_rooted_only


@pytest.mark.parametrize("name,options,flags", FISHER_OPTIONS, ids=[o[0] for o in FISHER_OPTIONS])
def test_fisher_matches_numpy_reference(data, name, options, flags):
    vocab, out, square_rooted_only = _fisher_case(data, options)
    for X, encoded in zip(data["sets"], out):
        expected = ref.fisher(X, vocab.means_, vocab.covariances_, vocab.weights_, **options)
        _assert_float32_close(encoded, expected, square_rooted_only)


@needs_vlfeat
@pytest.mark.parametrize("name,options,flags", FISHER_OPTIONS, ids=[o[0] for o in FISHER_OPTIONS])
def test_fisher_matches_vlfeat(data, name, options, flags):
    vocab, out, square_rooted_only = _fisher_case(data, options)
    for X, encoded in zip(data["sets"], out):
        theirs = vl.fisher_encode(X, vocab.means_, vocab.covariances_, vocab.weights_, flags)
        _assert_float32_close(encoded, theirs, square_rooted_only)


def test_fisher_weight_gradient(data):
    vocab = data["gmm"]
    out = FisherEncoder(vocabulary=vocab, include_weights=True).fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, 2 * K * D + K)
    for X, encoded in zip(data["sets"], out):
        expected = ref.fisher(X, vocab.means_, vocab.covariances_, vocab.weights_, include_weights=True)
        np.testing.assert_allclose(encoded, expected, atol=1e-5)


@needs_vlfeat
def test_fisher_float64_matches_vlfeat_double(data):
    vocab = data["gmm"]
    gmm64 = ref.gmm_vocabulary(*(a.astype(np.float64) for a in (vocab.means_, vocab.covariances_, vocab.weights_)))
    sets = [s.astype(np.float64) for s in data["sets"]]
    ours = FisherEncoder(vocabulary=gmm64, improved=False, power=None, l2=False).fit(sets).transform(sets)
    for X, encoded in zip(sets, ours):
        theirs = vl.fisher_encode(X, gmm64.means_, gmm64.covariances_, gmm64.weights_, 0)
        np.testing.assert_allclose(encoded, theirs.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("assignment", ["hard", "soft"])
@pytest.mark.parametrize("tf_idf,power,norm", [(False, None, None), (False, None, "l2"), (False, None, "l1"),
                                               (True, 0.5, "l2")])
def test_bof_matches_numpy_reference(data, assignment, tf_idf, power, norm):
    vocab = data["kmeans"]
    encoder = BoFEncoder(vocabulary=vocab, assignment=assignment, n_neighbors=3, sigma=0.9,
                         tf_idf=tf_idf, power=power, norm=norm).fit(data["sets"])
    out = encoder.transform(data["sets"])
    centers = vocab.centers_.astype(np.float64)
    weights = (ref.hard_weights if assignment == "hard"
               else lambda X, c: ref.knn_weights(X, c, 3, 0.5 / 0.9**2))
    idf = None
    if tf_idf:
        df = np.array([[weights(X.astype(np.float64), centers).sum(0)[k] > 0 if len(X) else False
                        for k in range(K)] for X in data["sets"]]).sum(0)
        idf = np.log((1 + 5) / (1 + df)) + 1
        np.testing.assert_allclose(encoder.idf_, idf)
    for X, encoded in zip(data["sets"], out):
        expected = ref.bof(X.astype(np.float64), centers, weights, idf, power, norm)
        if assignment == "hard" and norm is None and not tf_idf:
            np.testing.assert_array_equal(encoded, expected)  # integer counts: exactly
        else:
            np.testing.assert_allclose(encoded, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("encoder", [
    VLADEncoder(assignment="hard"), VLADEncoder(assignment="knn"), VLADEncoder(assignment="soft"),
    BoFEncoder(), BoFEncoder(assignment="soft", tf_idf=True), FisherEncoder(), FisherEncoder(fast=True),
], ids=["vlad-hard", "vlad-knn", "vlad-soft", "bof", "bof-soft-tfidf", "fisher", "fisher-fast"])
def test_edge_cases_are_finite_and_zero_where_empty(data, encoder):
    vocab = data["gmm"] if isinstance(encoder, FisherEncoder) else data["kmeans"]
    encoder = clone(encoder).set_params(vocabulary=vocab).fit(data["sets"])
    far = data["sets"][3][:5] * 1e4  # far from every word
    one = data["sets"][0][:1]
    empty = np.zeros((0, D), np.float32)
    out = encoder.transform([empty, one, far, empty])
    assert np.all(np.isfinite(out))
    assert not out[0].any() and not out[3].any()
    assert out[1].any() and out[2].any()
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[[1, 2]], 1.0, rtol=1e-5)


def test_word_without_members_keeps_a_zero_block(data):
    encoder = VLADEncoder(vocabulary=data["kmeans"], normalize_mass=True).fit(data["sets"])
    out = encoder.transform(data["sets"]).reshape(5, K, D)
    assert not out[:, K - 1].any()  # the far word: VLFeat leaves 0, not -c_k


def test_a_large_image_is_split_across_chunks_identically(data, monkeypatch):
    import vladkit.encoders._base as base

    sets = data["sets"]
    encoders = [VLADEncoder(vocabulary=data["kmeans"]), FisherEncoder(vocabulary=data["gmm"]),
                BoFEncoder(vocabulary=data["kmeans"], assignment="soft", sigma=1.0)]
    whole = [e.fit(sets).transform(sets) for e in encoders]
    monkeypatch.setattr(base, "CHUNK_ROWS", 16)  # every image split over several chunks
    for encoder, expected in zip(encoders, whole):
        np.testing.assert_allclose(encoder.transform(sets), expected, atol=1e-6)


def test_batch_equals_one_by_one(data):
    encoder = FisherEncoder(vocabulary=data["gmm"]).fit(data["sets"])
    batch = encoder.transform(data["sets"])
    for X, row in zip(data["sets"], batch):
        np.testing.assert_array_equal(encoder.transform([X])[0], row)


# ----------------------------------------------------------------- scikit-learn usage


def test_fit_trains_a_vocabulary_and_names_features(data):
    encoder = VLADEncoder(n_clusters=4, random_state=0).fit(data["sets"])
    assert isinstance(encoder.vocabulary_, KMeansVocabulary) and encoder.vocabulary_.n_words_ == 4
    names = encoder.get_feature_names_out()
    assert len(names) == encoder.n_features_out_ == 4 * D and names[D + 2] == "vlad_w1_d2"
    fisher = FisherEncoder(3, pca=6, random_state=0).fit(data["sets"])
    assert isinstance(fisher.vocabulary_, GMMVocabulary) and fisher.vocabulary_.dim_ == 6
    assert fisher.transform(data["sets"]).shape == (5, 2 * 3 * 6)
    assert BoFEncoder(5, random_state=0).fit(data["sets"]).get_feature_names_out()[4] == "bof_w4"


def test_vocabulary_from_file_and_unfitted_template(data, tmp_path):
    trained = KMeansVocabulary(4, random_state=0).fit(data["sets"])
    trained.save(tmp_path / "v.npz")
    from_file = VLADEncoder(vocabulary=tmp_path / "v.npz").fit(data["sets"])
    direct = VLADEncoder(vocabulary=trained).fit(data["sets"])
    np.testing.assert_array_equal(from_file.transform(data["sets"]), direct.transform(data["sets"]))
    assert direct.vocabulary_ is trained
    template = VLADEncoder(vocabulary=KMeansVocabulary(4, random_state=0)).fit(data["sets"])
    np.testing.assert_array_equal(template.vocabulary_.centers_, trained.centers_)
    assert template.vocabulary_ is not template.vocabulary  # the template stays unfitted
    # A fitted vocabulary survives sklearn.clone (it is a trained artifact, like its file).
    cloned = clone(VLADEncoder(vocabulary=trained)).fit(data["sets"][:1])
    assert cloned.vocabulary_ is trained


def test_errors(data):
    with pytest.raises(NotFittedError):
        VLADEncoder().transform(data["sets"])
    with pytest.raises(TypeError, match="needs a GMMVocabulary"):
        FisherEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    with pytest.raises(ValueError, match="assignment"):
        VLADEncoder(assignment="fuzzy").fit(data["sets"])
    encoder = VLADEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    with pytest.raises(ValueError, match="image 1: descriptors have dimension 3, the vocabulary expects 16"):
        encoder.transform([data["sets"][0], np.zeros((4, 3), np.float32)])
    bad = data["sets"][0].copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="image 0: descriptors contain NaN"):
        encoder.transform([bad])
    with pytest.raises(TypeError, match="one descriptor set per image"):
        encoder.transform(data["sets"][0])


def test_joblib_round_trip(data, tmp_path):
    encoder = FisherEncoder(4, random_state=0).fit(data["sets"])
    joblib.dump(encoder, tmp_path / "enc.joblib")
    loaded = joblib.load(tmp_path / "enc.joblib")
    np.testing.assert_array_equal(loaded.transform(data["sets"]), encoder.transform(data["sets"]))


@needs_vlfeat
def test_the_vlfeat_comparison_can_fail(data):
    """The bindings really call VLFeat: a different flag gives a different vector."""
    X = data["sets"][3]
    ours = VLADEncoder(vocabulary=data["kmeans"]).fit(data["sets"]).transform([X])[0]
    Q = ref.hard_weights(X.astype(np.float64), data["kmeans"].centers_.astype(np.float64)).astype(np.float32)
    same = vl.vlad_encode(X, data["kmeans"].centers_, Q, vl.VLAD_SQUARE_ROOT | vl.VLAD_NORMALIZE_COMPONENTS)
    other = vl.vlad_encode(X, data["kmeans"].centers_, Q, vl.VLAD_SQUARE_ROOT)
    assert np.abs(ours - same).max() <= 1e-5
    assert np.abs(ours - other).max() > 1e-3
