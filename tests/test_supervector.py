"""SuperVectorEncoder: super-vector coding (Zhou et al. 2010) against the slow numpy
reference (tests/reference.py: explicit per-word loops), on random descriptors and on real
dense RootSIFT, and its streaming, pyramid and scikit-learn behaviour."""

import os

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import reference as ref
from conftest import cli, scene15_rootsift, textured_image, word_sets
from vladkit import KMeansVocabulary, LocalFeatures, SpatialPyramid, SuperVectorEncoder
from vladkit.encoders.pyramid import cell_masks
from vladkit.pipeline.encodings import load_encodings

D, K = 16, 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def data():
    """Descriptor sets of 40, 0, 1, 300, 7 rows around 7 of 8 words (the 8th is far)."""
    sets, kmeans = word_sets(K, D)
    return {"sets": sets, "kmeans": kmeans}


@pytest.fixture(scope="module")
def rootsift():
    """Dense RootSIFT of 4 15-Scene images (2 classes x 2) and 32 k-means words on them."""
    return scene15_rootsift(32, 8_000)


def _hard(X, centers):
    Q = np.zeros((len(X), len(centers)))
    if len(X):
        Q[np.arange(len(X)), ref.squared_distances(X, centers).argmin(1)] = 1
    return Q


def _reference(encoder, sets):
    centers = encoder.vocabulary_.centers_.astype(np.float64)
    out = []
    for X in sets:
        X = X.astype(np.float64)
        if encoder.assignment == "hard":
            Q = _hard(X, centers)
        else:
            Q = ref.knn_weights(X, centers, encoder.n_neighbors, 0.5 / encoder.sigma_**2)
        out.append(ref.supervector(X, centers, Q, encoder.s, encoder.l2))
    return np.array(out)


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("assignment", ["hard", "soft"])
@pytest.mark.parametrize("s", [1.0, 0.0, 3.5])
@pytest.mark.parametrize("l2", [True, False])
def test_matches_numpy_reference(data, assignment, s, l2):
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"], assignment=assignment, s=s, l2=l2,
                                 n_neighbors=3, sigma=0.9)
    out = encoder.fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, K * (D + 1)) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(encoder, data["sets"]), rtol=0, atol=ATOL)
    blocks = out.reshape(5, K, D + 1)
    assert not blocks[:, K - 1].any() or assignment == "soft"  # the far word: nobody's
    assert not blocks[1].any()  # the empty set


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_matches_numpy_reference_on_dense_rootsift(rootsift, assignment):
    features, vocabulary = rootsift
    sets = [f.descriptors for f in features]
    encoder = SuperVectorEncoder(vocabulary=vocabulary, assignment=assignment).fit(sets)
    np.testing.assert_allclose(encoder.transform(sets), _reference(encoder, sets), rtol=0, atol=ATOL)


def test_blocks_by_hand():
    """Two words on a line, three descriptors: N = 3, n_0 = 2, n_1 = 1."""
    vocabulary = KMeansVocabulary.from_centers(np.array([[0.0, 0.0], [10.0, 0.0]], np.float32))
    X = np.array([[1.0, 0.0], [0.0, 3.0], [9.0, 0.0]], np.float32)
    out = SuperVectorEncoder(vocabulary=vocabulary, s=2.0, l2=False).fit([X]).transform([X])[0]
    expected = np.r_[np.sqrt(2 / 3) * np.r_[2.0, 0.5, 1.5], np.sqrt(1 / 3) * np.r_[2.0, -1.0, 0.0]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_soft_sigma_is_estimated_at_fit(data):
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"], assignment="soft").fit(data["sets"])
    assert encoder.sigma_ > 0
    assert SuperVectorEncoder(vocabulary=data["kmeans"]).fit(data["sets"]).sigma_ is None
    np.testing.assert_allclose(encoder.transform(data["sets"]), _reference(encoder, data["sets"]), atol=ATOL)


# ------------------------------------------------------------------------- properties


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_empty_sets_are_zero_and_the_others_unit_norm(data, assignment):
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"], assignment=assignment, sigma=0.9).fit(data["sets"])
    empty = np.zeros((0, D), np.float32)
    far = data["sets"][3][:5] * 1e4
    out = encoder.transform([empty, data["sets"][0], empty, data["sets"][2], far])
    assert np.all(np.isfinite(out))
    assert not out[0].any() and not out[2].any()
    np.testing.assert_allclose(np.linalg.norm(out[[1, 3, 4]], axis=1), 1.0, rtol=1e-6)


def test_invariant_to_descriptor_order(data):
    rng = np.random.default_rng(1)
    X = data["sets"][3]
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    np.testing.assert_allclose(encoder.transform([X[rng.permutation(len(X))]]), encoder.transform([X]),
                               rtol=0, atol=1e-6)


def test_batch_equals_one_by_one(data):
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    batch = encoder.transform(data["sets"])
    for X, row in zip(data["sets"], batch):
        np.testing.assert_array_equal(encoder.transform([X])[0], row)


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_streaming_in_pieces_equals_whole(data, assignment):
    from vladkit.encoders._base import Accumulation

    encoder = SuperVectorEncoder(vocabulary=data["kmeans"], assignment=assignment, sigma=0.9).fit(data["sets"])
    whole = encoder.transform(data["sets"])
    accumulation = Accumulation(encoder, len(data["sets"]), np.float32, max_rows=7)
    pieces = [(image, X[start:start + 11]) for image, X in enumerate(data["sets"])
              for start in range(0, len(X), 11)]
    for index in np.random.default_rng(2).permutation(len(pieces)):
        accumulation.add(*pieces[index])
    np.testing.assert_allclose(accumulation.finish(), whole, rtol=0, atol=1e-6)


def test_float32_and_float64_agree(data):
    encoder = SuperVectorEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    single = encoder.transform(data["sets"])
    double = encoder.transform([X.astype(np.float64) for X in data["sets"]])
    assert single.dtype == double.dtype == np.float32
    np.testing.assert_allclose(single, double, rtol=0, atol=1e-6)


def test_pyramid_cells_and_empty_cells(data):
    rng = np.random.default_rng(3)
    X = data["sets"][3][:120]
    positions = np.column_stack([rng.uniform(0, 31, len(X)), rng.uniform(0, 64, len(X))]).astype(np.float32)
    features = LocalFeatures(X, positions, np.ones(len(X), np.float32), (64, 64))
    levels = ((1, 1), (2, 2))
    pyramid = SpatialPyramid(SuperVectorEncoder(vocabulary=data["kmeans"]), levels=levels).fit([features])
    out = pyramid.transform([features])[0]
    centers = data["kmeans"].centers_.astype(np.float64)
    cells = [ref.supervector(X[mask].astype(np.float64), centers, _hard(X[mask].astype(np.float64), centers))
             for mask in cell_masks(features, levels)]
    np.testing.assert_allclose(out, ref.normalize(np.concatenate(cells), None, 0, True), rtol=0, atol=ATOL)
    blocks = out.reshape(5, -1)
    assert np.all(np.isfinite(out)) and not blocks[2].any() and not blocks[4].any()


# ------------------------------------------------------------------- scikit-learn usage


def test_fit_trains_a_vocabulary_and_names_features(data):
    encoder = SuperVectorEncoder(4, random_state=0).fit(data["sets"])
    assert isinstance(encoder.vocabulary_, KMeansVocabulary) and encoder.vocabulary_.n_words_ == 4
    names = encoder.get_feature_names_out()
    assert len(names) == encoder.n_features_out_ == 4 * (D + 1)
    assert names[0] == "sv_w0_s" and names[1] == "sv_w0_d0" and names[D + 1] == "sv_w1_s"
    assert names[D + 4] == "sv_w1_d2"


def test_not_fitted_and_parameter_errors(data):
    with pytest.raises(NotFittedError):
        SuperVectorEncoder().transform(data["sets"])
    with pytest.raises(NotFittedError):
        SuperVectorEncoder().get_feature_names_out()
    for params, name in [({"s": -1.0}, "s must"), ({"s": float("inf")}, "s must"), ({"s": "1"}, "s must"),
                         ({"assignment": "knn"}, "assignment"), ({"sigma": 0}, "sigma"),
                         ({"n_neighbors": 0}, "n_neighbors")]:
        with pytest.raises(ValueError, match=name):
            SuperVectorEncoder(vocabulary=data["kmeans"], **params).fit(data["sets"])


def test_in_a_pipeline_with_a_classifier(data):
    rng = np.random.default_rng(4)
    centers = data["kmeans"].centers_
    sets = [(centers[3 * (i % 2) + rng.integers(0, 3, 30)] + 0.3 * rng.standard_normal((30, D))).astype(np.float32)
            for i in range(20)]
    labels = np.arange(20) % 2
    pipeline = make_pipeline(SuperVectorEncoder(vocabulary=data["kmeans"]), LogisticRegression())
    pipeline.fit(sets, labels)
    assert (pipeline.predict(sets) == labels).mean() == 1.0
    assert len(clone(pipeline).fit(sets, labels).predict(sets[:3])) == 3


def test_cli_encode_with_sv(tmp_path):
    """``vladkit encode --encoder sv``: the recipe rebuilds the same encoder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(folder / f"img{i}.png"), textured_image(i, (64, 80)))
    code, _, err = cli("vocab", "build", folder, "-k", 8, "-o", tmp_path / "words.npz", "-q")
    assert code == 0, err
    code, _, err = cli("encode", folder, "--vocab", tmp_path / "words.npz", "--encoder", "sv",
                       "-o", tmp_path / "enc.npz", "-q")
    assert code == 0, err
    encoded = load_encodings(tmp_path / "enc.npz")
    assert encoded.recipe.encoder == "sv" and encoded.vectors.shape == (3, 8 * 129)
    assert encoded.recipe.encoder_params == {"s": 1.0, "assignment": "hard", "n_neighbors": 5, "sigma": None,
                                             "l2": True}
    extractor, encoder = encoded.recipe.build()
    assert isinstance(encoder, SuperVectorEncoder)
    order = [int(os.path.basename(path)[3]) for path in encoded.ids]
    images = [textured_image(i, (64, 80)) for i in order]
    np.testing.assert_allclose(encoder.transform(extractor.transform(images)), encoded.vectors, atol=1e-6)
