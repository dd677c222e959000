"""LLCEncoder: locality-constrained linear coding (Wang et al. 2010) against the slow numpy
reference (tests/reference.py: explicit k-NN by sorting, np.linalg.solve per descriptor),
on random descriptors and on real dense RootSIFT, and its streaming, pyramid and
scikit-learn behaviour."""

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
from vladkit import KMeansVocabulary, LLCEncoder, LocalFeatures, SpatialPyramid, load_vocabulary
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
    """Dense RootSIFT of 4 15-Scene images (2 classes x 2) and 64 k-means words on them."""
    return scene15_rootsift(64, 10_000)


def _reference(encoder, sets):
    centers = encoder.vocabulary_.centers_.astype(np.float64)
    return np.array([ref.llc(X.astype(np.float64), centers, encoder.n_neighbors, encoder.beta,
                             encoder.pooling, encoder.l2) for X in sets])


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("pooling", ["max", "sum"])
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("n_neighbors", [1, 3, 5, K, 20])
def test_matches_numpy_reference(data, pooling, l2, n_neighbors):
    encoder = LLCEncoder(vocabulary=data["kmeans"], n_neighbors=n_neighbors, pooling=pooling, l2=l2)
    out = encoder.fit(data["sets"]).transform(data["sets"])
    assert out.shape == (5, K) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(encoder, data["sets"]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_matches_numpy_reference_on_dense_rootsift(rootsift, pooling):
    features, vocabulary = rootsift
    sets = [f.descriptors for f in features]
    encoder = LLCEncoder(vocabulary=vocabulary, pooling=pooling).fit(sets)
    # 2 images of a few thousand descriptors each: the reference's loop is the slow part
    out = encoder.transform(sets[:2])
    np.testing.assert_allclose(out, _reference(encoder, sets[:2]), rtol=0, atol=ATOL)
    assert (out != 0).sum(axis=1).min() > 10


def test_codes_of_single_descriptors(data, rootsift):
    """Sum pooling without normalisation of one descriptor is its code: the reference's
    weights, at the k nearest words, summing to 1 (some negative on real data)."""
    features, vocabulary = rootsift
    rows = features[0].descriptors[::97]
    encoder = LLCEncoder(vocabulary=vocabulary, pooling="sum", l2=False, beta=1e-4).fit([rows])
    codes = encoder.transform([row[None] for row in rows])
    expected = ref.llc_codes(rows.astype(np.float64), vocabulary.centers_, 5, 1e-4)
    np.testing.assert_allclose(codes, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)
    assert ((codes != 0).sum(axis=1) == 5).all()
    assert (codes < 0).any()


def test_max_pooling_keeps_negative_codes_only_when_every_descriptor_has_them(data):
    """Word k's pooled value is the maximum of the codes u_ik, the zeros of descriptors
    that do not code k included (Wang et al.'s max over the (N, K) code matrix)."""
    encoder = LLCEncoder(vocabulary=data["kmeans"], n_neighbors=3, l2=False).fit(data["sets"])
    one = data["sets"][0][:1]
    codes = ref.llc_codes(one.astype(np.float64), data["kmeans"].centers_, 3)
    single = encoder.transform([one])[0]
    np.testing.assert_allclose(single, codes[0], atol=ATOL)
    assert (single < 0).any() and (single > 0).any()
    # two copies of the descriptor: the same codes, the same maxima, negatives included
    np.testing.assert_allclose(encoder.transform([np.repeat(one, 2, axis=0)])[0], single, atol=ATOL)
    pair = data["sets"][0][:2]
    expected = ref.llc_codes(pair.astype(np.float64), data["kmeans"].centers_, 3).max(axis=0)
    np.testing.assert_allclose(encoder.transform([pair])[0], expected, atol=ATOL)


def test_a_descriptor_on_its_only_word_has_code_one(data):
    """k = 1 and x = c: z = 0, C = 0. The code is 1 (the limit), not 0 / 0."""
    centers = data["kmeans"].centers_
    encoder = LLCEncoder(vocabulary=data["kmeans"], n_neighbors=1, pooling="sum", l2=False).fit(data["sets"])
    out = encoder.transform([centers[[2]], centers[[2, 2, 4]]])
    np.testing.assert_array_equal(out[0], np.eye(K)[2])
    np.testing.assert_array_equal(out[1], 2 * np.eye(K)[2] + np.eye(K)[4])
    # k > 1 with x on a word: finite, and that word weighs almost everything
    out = LLCEncoder(vocabulary=data["kmeans"], pooling="sum", l2=False).fit(data["sets"]).transform([centers[[3]]])
    assert np.all(np.isfinite(out)) and out[0, 3] > 0.99
    np.testing.assert_allclose(out[0], ref.llc(centers[[3]], centers, 5, 1e-4, "sum", False), atol=ATOL)


def test_huge_and_tiny_descriptors_are_finite(data):
    """C is formed from z scaled by a power of two: no overflow (1e200 squared) nor
    underflow in float64."""
    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    X = data["sets"][3][:20].astype(np.float64)
    for scale in (1e-200, 1e-20, 1e20, 1e200):
        out = encoder.transform([X * scale])
        assert np.all(np.isfinite(out)) and np.linalg.norm(out) == pytest.approx(1.0)


# ------------------------------------------------------------------------- properties


def test_empty_sets_are_zero_and_the_others_unit_norm(data):
    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    empty = np.zeros((0, D), np.float32)
    for pooling in ("max", "sum"):
        out = clone(encoder).set_params(pooling=pooling).fit(data["sets"]).transform(
            [empty, data["sets"][0], empty, data["sets"][2]])
        assert np.all(np.isfinite(out))
        assert not out[0].any() and not out[2].any()
        np.testing.assert_allclose(np.linalg.norm(out[[1, 3]], axis=1), 1.0, rtol=1e-6)


def test_invariant_to_descriptor_order(data):
    rng = np.random.default_rng(1)
    X = data["sets"][3]
    for pooling in ("max", "sum"):
        encoder = LLCEncoder(vocabulary=data["kmeans"], pooling=pooling).fit(data["sets"])
        np.testing.assert_allclose(encoder.transform([X[rng.permutation(len(X))]]), encoder.transform([X]),
                                   rtol=0, atol=1e-6)


def test_batch_equals_one_by_one(data):
    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    batch = encoder.transform(data["sets"])
    for X, row in zip(data["sets"], batch):
        np.testing.assert_array_equal(encoder.transform([X])[0], row)


@pytest.mark.parametrize("pooling", ["max", "sum"])
def test_streaming_in_pieces_equals_whole(data, pooling):
    """Pieces of the images, interleaved, in chunks of 7 rows (an image spans several
    chunks, a chunk several images): the running maxima and hit counts combine."""
    from vladkit.encoders._base import Accumulation

    encoder = LLCEncoder(vocabulary=data["kmeans"], pooling=pooling).fit(data["sets"])
    whole = encoder.transform(data["sets"])
    accumulation = Accumulation(encoder, len(data["sets"]), np.float32, max_rows=7)
    pieces = [(image, X[start:start + 11]) for image, X in enumerate(data["sets"])
              for start in range(0, len(X), 11)]
    rng = np.random.default_rng(2)
    for index in rng.permutation(len(pieces)):
        accumulation.add(*pieces[index])
    np.testing.assert_allclose(accumulation.finish(), whole, rtol=0, atol=1e-6)


def test_a_large_image_is_split_across_chunks_identically(data, monkeypatch):
    import vladkit.encoders._base as base

    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    whole = encoder.transform(data["sets"])
    monkeypatch.setattr(base, "CHUNK_ROWS", 16)
    np.testing.assert_allclose(encoder.transform(data["sets"]), whole, rtol=0, atol=1e-6)


def test_float32_and_float64_agree(data):
    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    single = encoder.transform(data["sets"])
    double = encoder.transform([X.astype(np.float64) for X in data["sets"]])
    assert single.dtype == double.dtype == np.float32
    np.testing.assert_allclose(single, double, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ spatial pyramid


def test_pyramid_max_pools_each_cell_and_empty_cells_are_zero(data):
    """Wang et al.'s pyramid: codes max-pooled per cell, concatenated, one L2 (l2=False
    inside). All descriptors in the left half: the right cells are empty, zero blocks."""
    rng = np.random.default_rng(3)
    X = data["sets"][3][:120]
    positions = np.column_stack([rng.uniform(0, 31, len(X)), rng.uniform(0, 64, len(X))]).astype(np.float32)
    features = LocalFeatures(X, positions, np.ones(len(X), np.float32), (64, 64))
    empty = LocalFeatures(np.zeros((0, D), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                          (64, 64))
    levels = ((1, 1), (2, 2))
    for l2 in (False, True):
        pyramid = SpatialPyramid(LLCEncoder(vocabulary=data["kmeans"], n_neighbors=3, l2=l2), levels=levels)
        out = pyramid.fit([features]).transform([features, empty])
        assert np.all(np.isfinite(out)) and not out[1].any()
        centers = data["kmeans"].centers_.astype(np.float64)
        cells = [ref.llc(X[mask].astype(np.float64), centers, 3, 1e-4, "max", l2)
                 for mask in cell_masks(features, levels)]
        expected = ref.normalize(np.concatenate(cells), None, 0, True)
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=ATOL)
        blocks = out[0].reshape(5, K)
        assert not blocks[2].any() and not blocks[4].any()  # the 2x2 level's right column
        assert blocks[1].any() and blocks[3].any()


# ------------------------------------------------------------------- scikit-learn usage


def test_fit_trains_a_vocabulary_and_names_features(data):
    encoder = LLCEncoder(6, random_state=0).fit(data["sets"])
    assert isinstance(encoder.vocabulary_, KMeansVocabulary) and encoder.vocabulary_.n_words_ == 6
    names = encoder.get_feature_names_out()
    assert list(names) == [f"llc_w{k}" for k in range(6)] and encoder.n_features_out_ == 6
    assert LLCEncoder().n_clusters == 1024 and LLCEncoder().n_neighbors == 5 and LLCEncoder().beta == 1e-4


def test_not_fitted_and_parameter_errors(data):
    with pytest.raises(NotFittedError):
        LLCEncoder().transform(data["sets"])
    with pytest.raises(NotFittedError):
        LLCEncoder().get_feature_names_out()
    for params, name in [({"beta": 0}, "beta"), ({"beta": -1.0}, "beta"), ({"beta": float("nan")}, "beta"),
                         ({"pooling": "mean"}, "pooling"), ({"n_neighbors": 0}, "n_neighbors")]:
        with pytest.raises(ValueError, match=name):
            LLCEncoder(vocabulary=data["kmeans"], **params).fit(data["sets"])
    encoder = LLCEncoder(vocabulary=data["kmeans"]).fit(data["sets"])
    with pytest.raises(ValueError, match="dimension"):
        encoder.transform([np.zeros((3, D + 1), np.float32)])


def test_in_a_pipeline_with_a_classifier(data):
    rng = np.random.default_rng(4)
    centers = data["kmeans"].centers_
    # two classes of images: descriptors around words 0-2, or around words 3-5
    sets = [(centers[rng.integers(0, 3) + 3 * (i % 2) + rng.integers(0, 3, 30) % 3] +
             0.3 * rng.standard_normal((30, D))).astype(np.float32) for i in range(20)]
    labels = np.arange(20) % 2
    pipeline = make_pipeline(LLCEncoder(vocabulary=data["kmeans"]), LogisticRegression())
    pipeline.fit(sets, labels)
    assert (pipeline.predict(sets) == labels).mean() == 1.0
    assert len(clone(pipeline).fit(sets, labels).predict(sets[:3])) == 3


# --------------------------------------------------------------------------- the CLI


def test_cli_encode_with_llc(tmp_path):
    """``vladkit encode --encoder llc``: the recipe rebuilds the same encoder."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(folder / f"img{i}.png"), textured_image(i, (64, 80)))
    code, _, err = cli("vocab", "build", folder, "-k", 8, "-o", tmp_path / "words.npz", "-q")
    assert code == 0, err
    code, _, err = cli("encode", folder, "--vocab", tmp_path / "words.npz", "--encoder", "llc",
                       "-o", tmp_path / "enc.npz", "-q")
    assert code == 0, err
    encoded = load_encodings(tmp_path / "enc.npz")
    assert encoded.recipe.encoder == "llc" and encoded.vectors.shape == (3, 8)
    assert encoded.recipe.encoder_params == {"n_neighbors": 5, "beta": 1e-4, "pooling": "max", "l2": True}
    extractor, encoder = encoded.recipe.build()
    assert isinstance(encoder, LLCEncoder)
    assert encoder.vocabulary_.centers_.shape == load_vocabulary(tmp_path / "words.npz").centers_.shape
    order = [int(os.path.basename(path)[3]) for path in encoded.ids]
    images = [textured_image(i, (64, 80)) for i in order]
    np.testing.assert_allclose(encoder.transform(extractor.transform(images)), encoded.vectors, atol=1e-6)
