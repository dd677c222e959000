"""The torch-free NetVLAD side (vladkit.encoders.netvlad): the forward pass against a slow,
obvious numpy reference for every option, the v1/v2 initialisations and their alpha, the
v2 initialisation against soft VLAD, files and their refusals, the scikit-learn and
streaming conventions (pieces, pyramid, clone, joblib, grid search, budget) and the CLI
(encode -> index build -> search). Nothing here needs torch."""

import json
import math
import pickle
import subprocess
import sys
from itertools import product

import cv2
import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.validation import check_is_fitted

from conftest import cli, scene15_train_photos, textured_image
from vladkit import (
    DenseSIFT,
    ImageEncoder,
    KMeansVocabulary,
    LocalFeatures,
    NetVLADEncoder,
    NetVLADParams,
    SpatialPyramid,
    VLADEncoder,
    VocabularyFileError,
    init_netvlad,
    load_netvlad,
    load_vocabulary,
    save_netvlad,
)
from vladkit._util.io import write_npz_atomically
from vladkit.pipeline.budget import encoder_memory, plan_batches
from vladkit.encoders._base import CHUNK_ROWS
from vladkit.encoders.netvlad_params import NetVLADFileError, netvlad_alpha, sample_descriptors
from vladkit.encoders.pyramid import cell_masks
from vladkit.pipeline.recipe import Recipe
from vladkit.pipeline.encodings import load_encodings

OPTIONS = ("normalize_input", "intra_norm", "l2")


# ------------------------------------------------------------------------- reference


def reference_netvlad(X, weight, bias, centers, normalize_input=True, intra_norm=True, l2=True,
                      layout="KxD"):
    """NetVLAD of ONE set, float64, following the 6 steps of the spec literally."""
    X = np.asarray(X, dtype=np.float64)
    W, C = np.asarray(weight, np.float64), np.asarray(centers, np.float64)
    K, D = W.shape
    if len(X) == 0:
        return np.zeros(K * D)
    if normalize_input:                                            # 1
        X = X / np.sqrt(np.sum(X ** 2, axis=1, keepdims=True) + 1e-12)
    S = X @ W.T + (0.0 if bias is None else np.asarray(bias, np.float64))   # 2
    A = np.exp(S - S.max(axis=1, keepdims=True))
    A /= A.sum(axis=1, keepdims=True)
    V = np.zeros((K, D))
    for k in range(K):                                             # 3, residuals themselves
        V[k] = np.sum(A[:, k:k + 1] * (X - C[k]), axis=0)
    if intra_norm:                                                 # 4
        V = V / np.sqrt(np.sum(V ** 2, axis=1, keepdims=True) + 1e-12)
    V = V.ravel() if layout == "KxD" else V.T.ravel()              # 5
    if l2:                                                         # 6
        V = V / (np.sqrt(np.sum(V ** 2)) + 1e-12)
    return V


def reference_of(params, X):
    return reference_netvlad(X, params.weight, params.bias, params.centers, **params.options)


def assert_close(actual, expected, tol):
    """|actual - expected| <= tol, relative to each row's largest value when above 1
    (vectors without normalisation)."""
    expected = np.atleast_2d(expected)
    scale = np.maximum(1.0, np.abs(expected).max(axis=1, keepdims=True))
    np.testing.assert_array_less(np.abs(np.atleast_2d(actual) - expected) / scale, tol)


def random_params(K, D, bias=True, seed=0, scale=3.0, **options):
    rng = np.random.default_rng(seed)
    return NetVLADParams(scale * rng.standard_normal((K, D)), rng.standard_normal(K) if bias else None,
                         0.3 * rng.standard_normal((K, D)), **options)


def synthetic_sets(D=12, seed=1):
    rng = np.random.default_rng(seed)
    sizes = (40, 0, 1, 300, 7)
    return [(rng.standard_normal((n, D)) * rng.uniform(0.5, 3)).astype(np.float32) for n in sizes]


def all_options():
    for normalize_input, intra_norm, l2, layout, bias in product((True, False), (True, False), (True, False),
                                                                 ("KxD", "DxK"), (True, False)):
        yield dict(normalize_input=normalize_input, intra_norm=intra_norm, l2=l2, layout=layout), bias


def option_id(case):
    options, bias = case
    return "-".join([k for k in OPTIONS if options[k]] + [options["layout"], "bias" if bias else "nobias"])


ALL_OPTIONS = list(all_options())


# ------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def scene15_features():
    """Dense RootSIFT of 6 15-Scene training images (3 classes x 2), as LocalFeatures."""
    chosen = scene15_train_photos(3, 2)
    return DenseSIFT(root=True, step=6, n_jobs=2).transform(chosen)


@pytest.fixture(scope="module")
def scene15_vocabulary(scene15_features):
    return KMeansVocabulary(16, random_state=0, max_descriptors=20_000,
                            descriptor_type="DenseSIFT(step=6, root=True)").fit(scene15_features)




# -------------------------------------------------------------- forward vs reference


@pytest.mark.parametrize("case", ALL_OPTIONS, ids=[option_id(c) for c in ALL_OPTIONS])
def test_every_option_matches_the_reference_synthetic(case):
    options, bias = case
    params = random_params(6, 12, bias=bias, **options)
    sets = synthetic_sets()
    encoder = NetVLADEncoder(params).fit(sets)
    vectors = encoder.transform(sets)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 72) and vectors.flags.c_contiguous
    expected = np.array([reference_of(params, X) for X in sets])
    assert_close(vectors, expected, 2e-6)
    # float64 descriptors are computed in float64 throughout (float32 output: 6e-8)
    vectors64 = encoder.transform([X.astype(np.float64) for X in sets])
    assert_close(vectors64, expected, 1.2e-7)
    assert not np.any(vectors[1]) and np.all(np.isfinite(vectors))


@pytest.mark.parametrize("case", ALL_OPTIONS, ids=[option_id(c) for c in ALL_OPTIONS])
def test_every_option_matches_the_reference_on_dense_rootsift(case, scene15_features, scene15_vocabulary):
    options, bias = case
    sets = [f.descriptors for f in scene15_features]
    params = init_netvlad(scene15_vocabulary, np.concatenate(sets)[::7], "v2" if bias else "v1", **options)
    vectors = NetVLADEncoder(params).fit(scene15_features).transform(scene15_features)
    expected = np.array([reference_of(params, X) for X in sets])
    assert_close(vectors, expected, 1e-5)


def test_layouts_are_permutations_and_feature_names_follow_them():
    sets = synthetic_sets(D=5)
    kxd = NetVLADEncoder(random_params(3, 5, layout="KxD", l2=False)).fit(sets)
    dxk = NetVLADEncoder(random_params(3, 5, layout="DxK", l2=False)).fit(sets)
    a, b = kxd.transform(sets), dxk.transform(sets)
    np.testing.assert_array_equal(b, a.reshape(-1, 3, 5).transpose(0, 2, 1).reshape(len(sets), -1))
    names = kxd.get_feature_names_out()
    assert list(names[:6]) == ["netvlad_w0_d0", "netvlad_w0_d1", "netvlad_w0_d2", "netvlad_w0_d3",
                               "netvlad_w0_d4", "netvlad_w1_d0"]
    assert list(dxk.get_feature_names_out()[:4]) == ["netvlad_w0_d0", "netvlad_w1_d0", "netvlad_w2_d0",
                                                     "netvlad_w0_d1"]
    assert len(names) == kxd.n_features_out_ == 15 and names.dtype == object


def test_empty_sets_give_zero_vectors_never_nan():
    params = random_params(4, 8)
    encoder = NetVLADEncoder(params).fit([np.zeros((0, 8), np.float32)])
    vectors = encoder.transform([np.zeros((0, 8), np.float32), np.zeros((0, 8)), np.zeros((3, 8), np.float32)])
    assert vectors.shape == (3, 32) and not np.any(vectors[:2]) and np.all(np.isfinite(vectors))
    # zero rows are normalised to zero (0 / sqrt(1e-12)): uniform-free scores b, -c residuals
    np.testing.assert_allclose(vectors[2], reference_of(params, np.zeros((3, 8))), atol=2e-6)
    assert encoder.transform([]).shape == (0, 32)


def test_huge_descriptors_without_input_normalisation_stay_finite():
    params = random_params(4, 8, normalize_input=False, scale=1.0)
    X = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32) * 1e30
    vector = NetVLADEncoder(params).fit([X]).transform([X])
    assert np.all(np.isfinite(vector))
    np.testing.assert_allclose(vector[0], reference_of(params, X), atol=1e-6)


def test_integer_descriptors_are_encoded_as_float32():
    params = random_params(4, 8)
    X = np.random.default_rng(0).integers(0, 255, (30, 8))
    vector = NetVLADEncoder(params).fit([X]).transform([X])
    np.testing.assert_allclose(vector[0], reference_of(params, X), atol=2e-6)


# ------------------------------------------------------------------- initialisation


def direct_alpha(centers, X, version):
    """alpha straight from the formula, descriptor by descriptor."""
    c = np.asarray(centers, np.float64)
    gaps = []
    for x in np.asarray(X, np.float64):
        if version == "v1":
            dots = sorted((c / np.linalg.norm(c, axis=1, keepdims=True)) @ x, reverse=True)
            gaps.append(dots[0] - dots[1])
        else:
            d2 = sorted(np.sum((x - c) ** 2, axis=1))
            gaps.append(d2[1] - d2[0])
    return -math.log(0.01) / np.mean(gaps)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_alpha_weight_and_bias_follow_the_formulas(version):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((7, 10))
    X = rng.standard_normal((400, 10)).astype(np.float32)
    Xn = X / np.sqrt(np.sum(X.astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-12)
    alpha = direct_alpha(centers, Xn, version)
    assert netvlad_alpha(centers, Xn, version) == pytest.approx(alpha, rel=1e-10)
    params = init_netvlad(centers, X, version)  # normalises the sample itself (normalize_input)
    assert params.metadata["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert params.metadata["init"] == version and params.metadata["n_init_descriptors"] == 400
    assert init_netvlad(centers, Xn, version).metadata["alpha"] == pytest.approx(alpha, rel=1e-6)
    c = centers.astype(np.float64)
    np.testing.assert_allclose(params.centers, c, rtol=1e-6)
    if version == "v1":
        assert params.bias is None
        np.testing.assert_allclose(params.weight, alpha * c / np.linalg.norm(c, axis=1, keepdims=True), rtol=1e-6)
    else:
        np.testing.assert_allclose(params.weight, 2 * alpha * c, rtol=1e-6)
        np.testing.assert_allclose(params.bias, -alpha * np.sum(c ** 2, axis=1), rtol=1e-6)
    # without input normalisation, the sample is used as given
    raw = init_netvlad(centers, X, version, normalize_input=False)
    assert raw.metadata["alpha"] == pytest.approx(direct_alpha(centers, X, version), rel=1e-6)
    assert not raw.normalize_input


def test_alpha_on_real_rootsift_and_from_a_vocabulary(scene15_features, scene15_vocabulary):
    sample = np.concatenate([f.descriptors for f in scene15_features])[::11]
    for version in ("v1", "v2"):
        params = init_netvlad(scene15_vocabulary, sample, version, metadata={"note": "x"})
        normalised = sample / np.sqrt(np.sum(sample.astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-12)
        assert params.metadata["alpha"] == pytest.approx(
            direct_alpha(scene15_vocabulary.centers_, normalised, version), rel=1e-6)
        assert params.metadata["descriptor_type"] == "DenseSIFT(step=6, root=True)"  # the vocabulary's
        assert params.metadata["note"] == "x"


def test_v2_init_is_soft_vlad(scene15_features, scene15_vocabulary):
    """softmax_k(2 alpha c_k . x - alpha ||c_k||^2) = softmax_k(-alpha ||x - c_k||^2): the v2
    layer is VLADEncoder(assignment="soft", alpha=alpha, power=None) on unit-norm
    descriptors (RootSIFT rows are unit-norm, or zero)."""
    sets = [f.descriptors for f in scene15_features]
    sample = np.concatenate(sets)[::5]

    def both(intra_norm, l2):
        params = init_netvlad(scene15_vocabulary, sample, "v2", intra_norm=intra_norm, l2=l2)
        netvlad = NetVLADEncoder(params).fit(sets).transform(sets)
        vlad = VLADEncoder(vocabulary=scene15_vocabulary, assignment="soft", alpha=params.metadata["alpha"],
                           power=None, intra_norm=intra_norm, l2=l2).fit(sets).transform(sets)
        return netvlad, vlad

    netvlad, vlad = both(intra_norm=False, l2=True)
    np.testing.assert_allclose(netvlad, vlad, rtol=0, atol=1e-5)
    raw_netvlad, raw_vlad = both(intra_norm=False, l2=False)  # the residual sums V_k themselves
    assert_close(raw_netvlad, raw_vlad, 1e-5)
    # Intra-normalisation: the same wherever a block's norm is well above the epsilons'
    # scale. Below, the conventions differ on purpose: VLFeat's v / max(||v||, 1e-12)
    # (VLADEncoder) makes a block of norm 1e-6 a unit block, MATLAB NetVLAD's
    # v / sqrt(||v||^2 + 1e-12) (NetVLADEncoder) halves it.
    norms = np.linalg.norm(raw_netvlad.reshape(len(sets), 16, 128), axis=2)
    netvlad, vlad = both(intra_norm=True, l2=False)
    large = np.repeat(norms >= 1e-3, 128, axis=1)
    assert large.mean() > 0.9
    np.testing.assert_allclose(netvlad[large], vlad[large], rtol=0, atol=1e-5)


def test_init_refuses_what_it_cannot_use():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6))
    with pytest.raises(ValueError, match="version"):
        init_netvlad(rng.standard_normal((4, 6)), X, "v3")
    with pytest.raises(ValueError, match="at least 2 centers"):
        init_netvlad(rng.standard_normal((1, 6)), X)
    with pytest.raises(ValueError, match="dimension 6, the centers 5"):
        init_netvlad(rng.standard_normal((4, 5)), X)
    with pytest.raises(ValueError, match="NaN"):
        init_netvlad(rng.standard_normal((4, 6)), np.full((3, 6), np.nan))
    with pytest.raises(ValueError, match="no descriptors"):
        init_netvlad(rng.standard_normal((4, 6)), np.zeros((0, 6)))
    with pytest.raises(ValueError, match="separates"):  # every descriptor equidistant
        init_netvlad(np.array([[1.0, 0], [-1.0, 0]]), np.array([[0.0, 1.0], [0.0, -1.0]]), "v2")
    with pytest.raises(ValueError, match="PCA"):
        init_netvlad(KMeansVocabulary(3, pca=2, random_state=0).fit([X]), X)
    from vladkit import GMMVocabulary
    with pytest.raises(TypeError, match="GMMVocabulary"):
        init_netvlad(GMMVocabulary(2, random_state=0).fit([X]), X)


def test_sample_descriptors_is_reproducible_and_bounded():
    rng = np.random.default_rng(0)
    sets = [rng.standard_normal((n, 4)) for n in (300, 5, 0, 120, 200)]
    a = sample_descriptors(sets, 250, 100, random_state=7)
    b = sample_descriptors(sets, 250, 100, random_state=7)
    np.testing.assert_array_equal(a, b)
    assert len(a) <= 250
    everything = sample_descriptors(sets, 10_000, 100)
    assert len(everything) == 100 + 5 + 100 + 100  # at most 100 per image, all images
    assert not np.array_equal(sample_descriptors(sets, 250, 100, random_state=8), a)


# ---------------------------------------------------------------------------- params


def test_params_are_checked_copied_and_compared():
    rng = np.random.default_rng(0)
    weight, centers = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    params = NetVLADParams(weight, None, centers)
    assert params.weight.dtype == np.float32 and params.weight.flags.c_contiguous
    assert (params.n_clusters, params.dim, params.n_features_out) == (3, 4, 12)
    weight[0, 0] = 99  # a copy: the caller's array (e.g. a torch tensor's view) is not shared
    assert params.weight[0, 0] != 99
    assert params == NetVLADParams(params.weight, None, params.centers)
    assert params != NetVLADParams(params.weight, np.zeros(3), params.centers)
    assert "n_clusters=3, dim=4, bias=False" in repr(params)
    for kwargs, message in [
        (dict(weight=np.zeros((3, 4)), bias=None, centers=np.zeros((3, 5))), "centers have shape"),
        (dict(weight=np.zeros((3, 4)), bias=np.zeros(4), centers=np.zeros((3, 4))), r"expected \(K,\)"),
        (dict(weight=np.zeros(4), bias=None, centers=np.zeros(4)), "2-D"),
        (dict(weight=np.full((3, 4), np.nan), bias=None, centers=np.zeros((3, 4))), "NaN"),
        (dict(weight=np.zeros((3, 4)), bias=None, centers=np.zeros((3, 4)), layout="KD"), "layout"),
        (dict(weight=np.zeros((3, 4)), bias=None, centers=np.zeros((3, 4)), l2="yes"), "l2"),
        (dict(weight=np.zeros((0, 4)), bias=None, centers=np.zeros((0, 4))), "K, D >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            NetVLADParams(**kwargs)


# ------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_with_what_was_expected():
    params = random_params(4, 8)
    good = np.zeros((5, 8), np.float32)
    with pytest.raises(ValueError, match=r"dimension \[7\], the NetVLAD parameters expect 8"):
        NetVLADEncoder(params).fit([np.zeros((5, 7))])
    encoder = NetVLADEncoder(params).fit([good])
    with pytest.raises(ValueError, match="image 1: descriptors have dimension 9, the NetVLAD parameters expect 8"):
        encoder.transform([good, np.zeros((2, 9), np.float32)])
    with pytest.raises(ValueError, match="image 1: descriptors contain NaN or inf"):
        encoder.transform([good, np.array([[np.nan] * 8], np.float32)])
    with pytest.raises(ValueError, match="NaN or inf"):
        encoder.transform([np.full((2, 8), np.inf)])
    with pytest.raises(TypeError, match="one descriptor set per image"):
        encoder.transform(good)
    with pytest.raises(ValueError, match="2-D"):
        encoder.transform([np.zeros(8)])
    with pytest.raises(ValueError, match="no images"):
        NetVLADEncoder(params).fit([])
    with pytest.raises(TypeError, match="NetVLAD parameters file .* or NetVLADParams, got NoneType"):
        NetVLADEncoder().fit([good])
    with pytest.raises(TypeError, match="got dict"):
        NetVLADEncoder({"weight": params.weight}).fit([good])
    with pytest.raises(NotFittedError):
        NetVLADEncoder(params).transform([good])
    with pytest.raises(NotFittedError):
        NetVLADEncoder(params).get_feature_names_out()


# ------------------------------------------------------------ streaming and pyramids


def test_pieces_and_chunks_equal_whole_images():
    params = random_params(5, 16, seed=2)
    rng = np.random.default_rng(4)
    sets = [rng.standard_normal((n, 16)).astype(np.float32) for n in (700, 1, 0, 2500)]
    encoder = NetVLADEncoder(params).fit(sets)
    whole = encoder.transform(sets)
    # pieces of the images, interleaved across images, through chunks of 300 rows
    from vladkit.encoders.netvlad import NetVLADAccumulation
    accumulation = NetVLADAccumulation(encoder, len(sets), np.float32, max_rows=300)
    pieces = [(image, piece) for image, X in enumerate(sets) for piece in np.array_split(X, 4)]
    for index in rng.permutation(len(pieces)):
        accumulation.add(*pieces[index])
    np.testing.assert_allclose(accumulation.finish(), whole, rtol=0, atol=1e-6)


def photo(seed, height, width):
    """A large grey 'photo' (textured blobs upscaled plus fine noise)."""
    rng = np.random.default_rng(seed)
    coarse = textured_image(seed, (max(8, height // 8), max(8, width // 8)))
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image += rng.integers(-12, 13, (height, width), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("pyramid", [False, True], ids=["plain", "pyramid"])
def test_image_encoder_in_pieces_under_a_small_budget_equals_whole(pyramid, monkeypatch):
    monkeypatch.setattr("vladkit._util.defaults.MIN_MAX_MEMORY", 1)
    images = [photo(1, 900, 1100), textured_image(2, (120, 160)), textured_image(3, (150, 100))]
    extractor = DenseSIFT(step=4, sizes=(4, 8), root=True, max_side=None, n_jobs=2)
    sample = extractor.transform(images[1:])
    vocabulary = KMeansVocabulary(16, random_state=0).fit(sample)
    params = init_netvlad(vocabulary, np.concatenate([f.descriptors for f in sample]), "v2")
    encoder = SpatialPyramid(NetVLADEncoder(params)) if pyramid else NetVLADEncoder(params)
    bounded = ImageEncoder(extractor, encoder, max_memory="150MB", max_descriptors=2_000, random_state=0)
    bounded.fit(images[1:])
    plan = [(b.indices, b.piece_bytes is not None)
            for b in plan_batches(images, extractor, 150 * 10**6, 64, bounded.encoder_)]
    assert plan == [([0], True), ([1, 2], False)]
    vectors = bounded.transform(images)
    whole = bounded.encoder_.transform(extractor.transform(images))
    np.testing.assert_allclose(vectors, whole, rtol=0, atol=1e-6)
    assert vectors.shape[1] == 16 * 128 * (8 if pyramid else 1)


def test_encoder_memory_counts_netvlad():
    params = random_params(64, 128)
    encoder = NetVLADEncoder(params).fit([np.zeros((0, 128), np.float32)])
    fixed, per_image = encoder_memory(encoder)
    assert fixed == CHUNK_ROWS * 4 * (5 * 128 + 3 * 64)
    assert per_image >= 8 * 64 * 128  # the float64 sums at least
    pyramid = SpatialPyramid(NetVLADEncoder(params)).fit([np.zeros((0, 128), np.float32)])
    assert encoder_memory(pyramid) == (fixed, 8 * per_image)


def test_pyramid_cells_are_encoded_as_images():
    rng = np.random.default_rng(5)
    params = random_params(3, 8, seed=5)
    features = []
    for n in (200, 0, 31):
        positions = rng.uniform(0, 60, (n, 2)).astype(np.float32)
        features.append(LocalFeatures(rng.standard_normal((n, 8)).astype(np.float32), positions,
                                      np.ones(n, np.float32), (60, 60)))
    pyramid = SpatialPyramid(NetVLADEncoder(params)).fit(features)
    vectors = pyramid.transform(features)
    levels = [(1, 1), (2, 2), (1, 3)]
    for image, f in enumerate(features):
        cells = [reference_of(params, f.descriptors[mask]) for mask in cell_masks(f, levels)]
        expected = np.concatenate(cells)
        expected /= max(np.linalg.norm(expected), 1e-12)
        np.testing.assert_allclose(vectors[image], expected, atol=2e-6)
    assert pyramid.get_feature_names_out()[0] == "spm1x1_r0c0_netvlad_w0_d0"


# ------------------------------------------------------------------ scikit-learn


def test_clone_joblib_pickle_and_params(tmp_path):
    params = random_params(4, 8)
    sets = synthetic_sets(D=8)
    encoder = NetVLADEncoder(params, n_jobs=1).fit(sets)
    expected = encoder.transform(sets)
    copy = clone(encoder)
    assert copy.get_params()["params"] == params and copy.n_jobs == 1
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)
    np.testing.assert_array_equal(copy.fit(sets).transform(sets), expected)
    joblib.dump(encoder, tmp_path / "encoder.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "encoder.joblib").transform(sets), expected)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(encoder)).transform(sets), expected)
    check_is_fitted(encoder)
    # fitted parameters are a checked copy: changing the given object later changes nothing
    params.weight[:] = 0
    np.testing.assert_array_equal(encoder.transform(sets), expected)
    assert encoder.set_params(n_jobs=2) is encoder and encoder.n_jobs == 2
    with pytest.raises(ValueError, match="Invalid parameter"):
        encoder.set_params(vocabulary__n_clusters=3)
    assert "params=NetVLADParams(n_clusters=4, dim=8, bias=True" in repr(encoder)


def test_file_path_params_and_grid_search(tmp_path):
    rng = np.random.default_rng(6)
    centers = rng.standard_normal((2, 6))
    sets, labels = [], []
    for i in range(24):
        label = i % 2
        sets.append((centers[label] + 0.5 * rng.standard_normal((30, 6))).astype(np.float32))
        labels.append(label)
    sharp = init_netvlad(np.r_[centers, -centers], np.concatenate(sets), "v2")
    blunt = init_netvlad(np.r_[centers, -centers], np.concatenate(sets), "v1")
    save_netvlad(sharp, tmp_path / "sharp.npz")
    from_file = NetVLADEncoder(str(tmp_path / "sharp.npz")).fit(sets)
    np.testing.assert_array_equal(from_file.transform(sets), NetVLADEncoder(sharp).fit(sets).transform(sets))
    pipeline = make_pipeline(NetVLADEncoder(sharp), LogisticRegression(max_iter=200))
    search = GridSearchCV(pipeline, {"netvladencoder__params": [sharp, blunt, tmp_path / "sharp.npz"]}, cv=2)
    search.fit(sets, labels)
    assert search.best_score_ >= 0.9
    assert len(search.cv_results_["params"]) == 3


def test_never_imports_torch():
    code = ("import sys, numpy as np, vladkit\n"
            "from vladkit import NetVLADEncoder, init_netvlad\n"
            "X = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)\n"
            "p = init_netvlad(X[:4], X, 'v2')\n"
            "NetVLADEncoder(p).fit([X]).transform([X])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip_is_byte_reproducible(tmp_path):
    for bias, layout in ((True, "KxD"), (False, "DxK")):
        params = random_params(5, 7, bias=bias, layout=layout, intra_norm=False)
        params.metadata = {"descriptor_type": "DenseSIFT(step=4)", "init": "v2", "alpha": 1.5,
                           "training": {"epochs": 3, "loss": [0.5, 0.25]}}
        save_netvlad(params, tmp_path / "a.npz")
        save_netvlad(params, tmp_path / "b.npz")
        loaded = load_netvlad(tmp_path / "a.npz")
        assert loaded == params and loaded.layout == layout and not loaded.intra_norm
        save_netvlad(loaded, tmp_path / "c.npz")
        first = (tmp_path / "a.npz").read_bytes()
        assert first == (tmp_path / "b.npz").read_bytes() == (tmp_path / "c.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["centers", "metadata", "weight"]  # no bias: v1
        metadata = json.loads(str(archive["metadata"]))
    assert metadata["format"] == "vladkit-netvlad" and metadata["format_version"] == 1
    assert metadata["options"] == {"normalize_input": True, "intra_norm": False, "l2": True, "layout": "DxK"}
    assert (metadata["n_clusters"], metadata["dim"], metadata["bias"]) == (5, 7, False)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left


def test_save_refuses_metadata_that_is_not_json(tmp_path):
    params = random_params(2, 3)
    params.metadata = {"bad": object()}
    with pytest.raises(ValueError, match="JSON"):
        save_netvlad(params, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    with pytest.raises(TypeError, match="NetVLADParams"):
        save_netvlad({"weight": 1}, tmp_path / "x.npz")


def _write(path, metadata, **arrays):
    arrays["metadata"] = np.array(json.dumps(metadata))
    write_npz_atomically(path, arrays)


def _good_metadata(K=3, D=4, bias=True, **changes):
    metadata = {"format": "vladkit-netvlad", "format_version": 1, "n_clusters": K, "dim": D, "bias": bias,
                "dtype": "float32", "vladkit_version": "0.1.0", "metadata": {},
                "options": {"normalize_input": True, "intra_norm": True, "l2": True, "layout": "KxD"}}
    metadata.update(changes)
    return metadata


def test_load_refuses_files_that_are_not_right(tmp_path):
    f32 = np.float32
    good = dict(weight=np.zeros((3, 4), f32), centers=np.zeros((3, 4), f32), bias=np.zeros(3, f32))
    cases = {}
    (tmp_path / "text.npz").write_text("not a zip")
    cases["text.npz"] = "not a NetVLAD parameters file .*not a readable .npz"
    np.savez(tmp_path / "nometa.npz", weight=good["weight"])
    cases["nometa.npz"] = "no metadata entry"
    vocabulary = KMeansVocabulary(2, random_state=0).fit([np.random.default_rng(0).standard_normal((20, 4))])
    vocabulary.save(tmp_path / "vocab.npz")
    cases["vocab.npz"] = "is a vladkit vocabulary .*not a NetVLAD parameters file"
    _write(tmp_path / "enc.npz", {"format": "vladkit-encodings"}, vectors=np.zeros((1, 2), f32))
    cases["enc.npz"] = "is a vladkit encodings file"
    _write(tmp_path / "v2.npz", _good_metadata(format_version=2), **good)
    cases["v2.npz"] = "format version 2; this vladkit .* reads version 1"
    _write(tmp_path / "shape.npz", _good_metadata(), **dict(good, weight=np.zeros((3, 5), f32)))
    cases["shape.npz"] = r"weight has shape \(3, 5\) and dtype float32, expected \(3, 4\) float32"
    _write(tmp_path / "biasshape.npz", _good_metadata(), **dict(good, bias=np.zeros(4, f32)))
    cases["biasshape.npz"] = r"bias has shape \(4,\)"
    _write(tmp_path / "dtype.npz", _good_metadata(), **dict(good, centers=np.zeros((3, 4))))
    cases["dtype.npz"] = "centers has shape .* dtype float64, expected .* float32"
    _write(tmp_path / "nan.npz", _good_metadata(), **dict(good, weight=np.full((3, 4), np.nan, f32)))
    cases["nan.npz"] = "weight contains NaN or inf"
    _write(tmp_path / "missing.npz", _good_metadata(), weight=good["weight"], centers=good["centers"])
    cases["missing.npz"] = r"missing arrays \['bias'\]"
    _write(tmp_path / "extra.npz", _good_metadata(bias=False), **good)
    cases["extra.npz"] = r"unexpected arrays \['bias'\]"
    _write(tmp_path / "sizes.npz", _good_metadata(n_clusters="3"), **good)
    cases["sizes.npz"] = "n_clusters and dim"
    _write(tmp_path / "layout.npz", _good_metadata(options={"normalize_input": True, "intra_norm": True,
                                                            "l2": True, "layout": "K-D"}), **good)
    cases["layout.npz"] = "layout must be one of"
    _write(tmp_path / "options.npz", _good_metadata(options={"l2": True}), **good)
    cases["options.npz"] = "options must give"
    np.savez(tmp_path / "pickled.npz", weight=np.array([object()], dtype=object), metadata=np.array("{}"))
    cases["pickled.npz"] = "pickled Python objects"
    (tmp_path / "meta.npz").unlink(missing_ok=True)
    write_npz_atomically(tmp_path / "meta.npz", {"metadata": np.array("{not json")})
    cases["meta.npz"] = "not valid JSON"
    for name, message in cases.items():
        with pytest.raises(NetVLADFileError, match=message) as caught:
            load_netvlad(tmp_path / name)
        assert name in str(caught.value)
    assert isinstance(NetVLADFileError("x"), ValueError)
    with pytest.raises(FileNotFoundError):
        load_netvlad(tmp_path / "absent.npz")
    # and the good one loads
    _write(tmp_path / "good.npz", _good_metadata(), **good)
    assert load_netvlad(tmp_path / "good.npz").n_clusters == 3


def test_a_vocabulary_and_netvlad_parameters_are_not_mistaken(tmp_path):
    X = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    vocabulary = KMeansVocabulary(3, random_state=0).fit([X])
    vocabulary.save(tmp_path / "vocab.npz")
    save_netvlad(init_netvlad(vocabulary, X), tmp_path / "netvlad.npz")
    with pytest.raises(NetVLADFileError, match="vocab.npz' is a vladkit vocabulary"):
        NetVLADEncoder(str(tmp_path / "vocab.npz")).fit([X])
    with pytest.raises(VocabularyFileError, match="not a vladkit vocabulary .*vladkit-netvlad"):
        VLADEncoder(vocabulary=str(tmp_path / "netvlad.npz")).fit([X])
    with pytest.raises(VocabularyFileError, match="vladkit-netvlad"):
        load_vocabulary(tmp_path / "netvlad.npz")
    recipe = Recipe("DenseSIFT", {}, "vlad", {}, None, str(tmp_path / "netvlad.npz"), "")
    with pytest.raises(ValueError, match="the vlad encoder needs a vocabulary .*got NetVLAD parameters"):
        recipe.build()
    recipe = Recipe("DenseSIFT", {}, "netvlad", {}, None, str(tmp_path / "vocab.npz"), "")
    with pytest.raises(ValueError, match="the netvlad encoder needs NetVLAD parameters"):
        recipe.build()
    recipe = Recipe("DenseSIFT", {}, "netvlad", {}, [[1, 1], [2, 2]], str(tmp_path / "netvlad.npz"), "")
    _, encoder = recipe.build()
    assert isinstance(encoder, SpatialPyramid) and encoder.n_features_out_ == 5 * 12


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def netvlad_project(tmp_path_factory):
    """Images, a k-means vocabulary from the CLI, and NetVLAD parameters (v2) from it."""
    root = tmp_path_factory.mktemp("netvlad_cli")
    images = root / "images"
    images.mkdir()
    for i in range(6):
        assert cv2.imwrite(str(images / f"img{i}.png"), textured_image(40 + i, (96, 120)))
    code, _, err = cli("vocab", "build", images, "-k", 8, "--root", "-o", root / "words.npz", "-q")
    assert code == 0, err
    vocabulary = load_vocabulary(root / "words.npz")
    extractor = DenseSIFT(root=True)
    descriptors = np.concatenate([f.descriptors for f in extractor.transform(sorted(images.glob("*.png")))])
    params = init_netvlad(vocabulary, descriptors, "v2")
    assert params.metadata["descriptor_type"] == vocabulary.descriptor_type
    save_netvlad(params, root / "netvlad.npz")
    return root


def test_cli_encode_index_search_end_to_end(netvlad_project, tmp_path):
    root = netvlad_project
    code, out, err = cli("encode", root / "images", "--vocab", root / "netvlad.npz", "-o", tmp_path / "enc.npz", "-q")
    assert code == 0, err
    assert "netvlad" in out
    encoded = load_encodings(tmp_path / "enc.npz")
    assert encoded.recipe.encoder == "netvlad" and encoded.recipe.encoder_params == {}
    assert encoded.recipe.extractor == "DenseSIFT" and encoded.recipe.extractor_params["root"] is True
    assert encoded.vectors.shape == (6, 8 * 128)
    # the same vectors as the library computes them
    extractor, encoder = encoded.recipe.build()
    assert isinstance(encoder, NetVLADEncoder)
    expected = encoder.transform(extractor.transform(encoded.ids))
    np.testing.assert_allclose(encoded.vectors, expected, rtol=0, atol=1e-6)
    # --encoder netvlad is accepted and gives the same bytes
    code, _, err = cli("encode", root / "images", "--vocab", root / "netvlad.npz", "--encoder", "netvlad",
                       "-o", tmp_path / "enc2.npz", "-q")
    assert code == 0, err
    assert (tmp_path / "enc.npz").read_bytes() == (tmp_path / "enc2.npz").read_bytes()
    code, _, err = cli("index", "build", tmp_path / "enc.npz", "-o", tmp_path / "idx")
    assert code == 0, err
    assert (tmp_path / "idx" / "vocabulary.npz").read_bytes() == (root / "netvlad.npz").read_bytes()
    query = root / "images" / "img3.png"
    code, out, err = cli("search", tmp_path / "idx", query, "--top", 2, "--json")
    assert code == 0, err
    answer = json.loads(out)[0]
    assert answer["results"][0]["id"] == str(query) and answer["results"][0]["score"] == pytest.approx(1, abs=1e-5)


def test_cli_encode_with_a_pyramid(netvlad_project, tmp_path):
    root = netvlad_project
    code, _, err = cli("encode", root / "images", "--vocab", root / "netvlad.npz", "--pyramid",
                       "-o", tmp_path / "enc.npz", "-q")
    assert code == 0, err
    encoded = load_encodings(tmp_path / "enc.npz")
    assert encoded.vectors.shape == (6, 8 * 8 * 128) and encoded.recipe.pyramid is not None
    extractor, encoder = encoded.recipe.build()
    np.testing.assert_allclose(encoded.vectors, encoder.transform(extractor.transform(encoded.ids)), atol=1e-6)


def test_cli_refuses_mismatched_encoder_and_file(netvlad_project, tmp_path):
    root = netvlad_project
    code, _, err = cli("encode", root / "images", "--vocab", root / "netvlad.npz", "--encoder", "vlad",
                       "-o", tmp_path / "x.npz", "-q")
    assert code == 2 and "the vlad encoder needs a vocabulary" in err and "netvlad" in err, err
    code, _, err = cli("encode", root / "images", "--vocab", root / "words.npz", "--encoder", "netvlad",
                       "-o", tmp_path / "x.npz", "-q")
    assert code == 2 and "the netvlad encoder needs NetVLAD parameters" in err, err
    assert not (tmp_path / "x.npz").exists()
    code, _, err = cli("vocab", "info", root / "netvlad.npz")
    assert code == 1 and "not a vladkit vocabulary" in err and "vladkit-netvlad" in err, err
