"""Spatially augmented descriptors (Sanchez, Perronnin & de Campos 2012): the appended
positions, the PCA that leaves them as they are, the spatial Fisher vector against a
numpy reference, and the ways in (pipeline, extractor option, ImageEncoder, recipes, CLI)."""

import warnings

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

import reference as ref
from conftest import cli, scene15_train_photos
from vladkit import (
    SIFT,
    BoFEncoder,
    DenseSIFT,
    EncodedImages,
    FisherEncoder,
    GMMVocabulary,
    ImageEncoder,
    ImageSkippedWarning,
    KMeansVocabulary,
    LocalFeatures,
    Recipe,
    SpatialAugmentation,
    SpatialPyramid,
    VLADEncoder,
    augment_positions,
    load_encodings,
    load_vocabulary,
)
from vladkit.pipeline.recipe import describe_extractor, parse_extractor
from vladkit.pipeline.jobs import encode_images



def expected_columns(features, scale):
    """scale * (x / w - 0.5, y / h - 0.5), computed the obvious way (float64, then the
    descriptors' float32)."""
    h, w = features.image_shape
    x, y = features.positions[:, 0].astype(np.float64), features.positions[:, 1].astype(np.float64)
    return np.stack([scale * (x / w - 0.5), scale * (y / h - 0.5)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def scene15_images():
    """6 real 15-Scene photos (3 classes x 2) as grey arrays, the last two cropped to
    200 x 150 and 120 x 200 so that width and height differ."""
    chosen = scene15_train_photos(3, 2)
    images = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in chosen]
    images[-2] = np.ascontiguousarray(images[-2][:, :150])
    images[-1] = np.ascontiguousarray(images[-1][:120, :])
    return images


@pytest.fixture(scope="module")
def plain(scene15_images):
    # Low-contrast descriptors dropped, not zeroed: identical zero rows make a Gaussian at
    # the variance floor, whose statistics turn the float32 rounding of the encoder's
    # projection into differences of 1e-5 from the float64 reference.
    return DenseSIFT(step=6, root=True, low_contrast="drop", n_jobs=2).transform(scene15_images)


@pytest.fixture(scope="module")
def augmented(plain):
    return SpatialAugmentation().transform(plain)


# ------------------------------------------------------------------ the appended columns


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("extractor", [DenseSIFT(step=6, root=True), SIFT(root=True)], ids=["dense", "sift"])
def test_appended_columns_follow_the_formula_on_real_images(scene15_images, extractor, scale):
    plain = extractor.transform(scene15_images)
    augmented = clone(extractor).set_params(spatial_augmentation=scale).transform(scene15_images)
    by_transformer = SpatialAugmentation(scale).transform(plain)
    assert {f.image_shape for f in plain} >= {(200, 150), (120, 200)}
    for before, after, other in zip(plain, augmented, by_transformer):
        n, dim = before.descriptors.shape
        assert n > 0 and dim == 128
        assert after.descriptors.shape == (n, 130) and after.descriptors.dtype == np.float32
        assert after.descriptors.flags.c_contiguous
        np.testing.assert_array_equal(after.descriptors[:, :128], before.descriptors)
        np.testing.assert_array_equal(after.descriptors[:, 128:], expected_columns(before, scale))
        np.testing.assert_array_equal(after.positions, before.positions)
        np.testing.assert_array_equal(after.scales, before.scales)
        assert after.image_shape == before.image_shape
        # the transformer and the extractor option give the same bytes
        np.testing.assert_array_equal(other.descriptors, after.descriptors)
        # the positions span about [-scale/2, scale/2]
        assert np.all(np.abs(after.descriptors[:, 128:]) <= scale / 2)


def test_pieces_are_augmented_as_the_whole_image(scene15_images):
    extractor = DenseSIFT(step=4, root=True, spatial_augmentation=1.0)
    whole = extractor.transform([scene15_images[0]])[0]
    pieces = list(extractor.extract_pieces(scene15_images[0], max_bytes=200_000))
    assert len(pieces) > 1
    np.testing.assert_array_equal(np.concatenate([p.descriptors for p in pieces]), whole.descriptors)


def test_empty_sets_stay_empty_with_two_more_columns(tmp_path):
    constant = np.full((64, 80), 128, np.uint8)
    (features,) = SIFT(spatial_augmentation=1.0).transform([constant])  # no keypoints
    assert features.descriptors.shape == (0, 130) and features.image_shape == (64, 80)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.warns(ImageSkippedWarning):
        (skipped,) = DenseSIFT(spatial_augmentation=1.0, on_error="skip").transform([str(broken)])
    assert skipped.descriptors.shape == (0, 130) and skipped.image_shape == (0, 0)
    empty = LocalFeatures(np.zeros((0, 5), np.float64), np.zeros((0, 2), np.float32),
                          np.zeros(0, np.float32), (0, 0))
    out = augment_positions(empty)
    assert out.descriptors.shape == (0, 7) and out.descriptors.dtype == np.float64
    assert DenseSIFT(spatial_augmentation=2.0)._descriptor_dim == 130 == SIFT(spatial_augmentation=1)._descriptor_dim


def test_dtypes_and_errors():
    features = LocalFeatures(np.arange(6, dtype=np.uint8).reshape(2, 3), np.array([[0, 0], [9, 4]], np.float32),
                             np.ones(2, np.float32), (5, 10))
    out = augment_positions(features, 2)
    assert out.descriptors.dtype == np.float32
    np.testing.assert_array_equal(out.descriptors, np.float32([[0, 1, 2, -1, -1], [3, 4, 5, 0.8, 0.6]]))
    wide = LocalFeatures(features.descriptors.astype(np.float64), features.positions, features.scales, (5, 10))
    assert augment_positions(wide).descriptors.dtype == np.float64
    for scale in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            SpatialAugmentation(scale).fit([features])
        with pytest.raises(ValueError, match="spatial_augmentation"):
            DenseSIFT(spatial_augmentation=scale).transform([np.zeros((40, 40), np.uint8)])
    with pytest.raises(TypeError, match="LocalFeatures"):
        SpatialAugmentation().transform([np.zeros((3, 128), np.float32)])
    with pytest.raises(ValueError, match="image_shape"):
        augment_positions(LocalFeatures(features.descriptors, features.positions, features.scales, (0, 10)))
    transformer = SpatialAugmentation(0.5)
    assert clone(transformer).get_params() == {"scale": 0.5}
    assert transformer.fit_transform([features])[0].descriptors.shape == (2, 5)


def test_scikit_learn_api_checks():
    from sklearn.utils.estimator_checks import (
        check_do_not_raise_errors_in_init_or_set_params,
        check_estimator_cloneable,
        check_estimator_repr,
        check_get_params_invariance,
        check_mixin_order,
        check_no_attributes_set_in_init,
        check_parameters_default_constructible,
        check_set_params,
        check_valid_tag_types,
    )
    from sklearn.utils import get_tags

    name, estimator = "SpatialAugmentation", SpatialAugmentation(2.0)
    for check in (check_do_not_raise_errors_in_init_or_set_params, check_estimator_cloneable,
                  check_estimator_repr, check_get_params_invariance, check_mixin_order,
                  check_no_attributes_set_in_init, check_parameters_default_constructible, check_set_params):
        check(name, estimator)
    check_valid_tag_types(name, estimator)
    tags = get_tags(estimator)
    assert not tags.requires_fit and not tags.input_tags.two_d_array


def test_memory_estimate_counts_the_longer_copy():
    for plain in (DenseSIFT(), SIFT()):
        output, scratch = plain.memory_estimate(480, 640)
        aug_output, aug_scratch = clone(plain).set_params(spatial_augmentation=1.0).memory_estimate(480, 640)
        assert aug_output > output and aug_scratch >= scratch + output


# ------------------------------------------------------- PCA of the appearance only


@pytest.mark.parametrize("cls", [GMMVocabulary, KMeansVocabulary])
@pytest.mark.parametrize("whiten", [False, True])
def test_pca_keeps_the_positions_exactly(plain, augmented, cls, whiten, tmp_path):
    vocab = cls(4, pca=16, whiten=whiten, passthrough_dims=2, max_descriptors=5000, random_state=0,
                max_iter=20).fit(augmented)
    assert vocab.dim_ == 18 and vocab.descriptor_dim_ == 130
    assert vocab.pca_components_.shape == (18, 130) and vocab.pca_mean_.shape == (130,)
    X = np.concatenate([f.descriptors for f in augmented])
    projected = vocab.project(X)
    np.testing.assert_array_equal(projected[:, 16:], X[:, 128:])  # exactly: identity rows, zero mean
    # the appearance's PCA is the one of the plain descriptors (same sample rows)
    appearance = cls(4, pca=16, whiten=whiten, max_descriptors=5000, random_state=0, max_iter=20).fit(plain)
    np.testing.assert_allclose(vocab.pca_mean_[:128], appearance.pca_mean_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vocab.pca_components_[:16, :128], appearance.pca_components_, rtol=1e-5, atol=1e-5)
    assert not np.any(vocab.pca_components_[:16, 128:]) and not np.any(vocab.pca_components_[16:, :128])
    np.testing.assert_allclose(projected[:, :16], appearance.project(X[:, :128]), rtol=1e-4, atol=1e-4)
    # a saved vocabulary keeps all of it (and its parameter)
    vocab.save(tmp_path / "v.npz")
    loaded = load_vocabulary(tmp_path / "v.npz")
    assert loaded.passthrough_dims == 2 and loaded.get_params() == vocab.get_params()
    np.testing.assert_array_equal(loaded.project(X), projected)


def test_passthrough_is_validated(augmented):
    for value in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="passthrough_dims"):
            GMMVocabulary(2, pca=4, passthrough_dims=value).fit(augmented)
        with pytest.raises(ValueError, match="passthrough_dims"):
            FisherEncoder(2, passthrough_dims=value).fit(augmented)
    with pytest.raises(ValueError, match=r"pca=129 exceeds the descriptor dimension 128 \(130 minus passthrough"):
        GMMVocabulary(2, pca=129, passthrough_dims=2).fit(augmented)
    with pytest.raises(ValueError, match="leaves no dimension"):
        GMMVocabulary(2, pca=1, passthrough_dims=130).fit(augmented)
    # without PCA there is nothing to pass through: the words are on all 130 dimensions
    assert GMMVocabulary(2, passthrough_dims=2, max_descriptors=2000, random_state=0).fit(augmented).dim_ == 130


def test_gmm_falls_back_to_float64_when_float32_em_loses_a_variance(monkeypatch):
    # Measured on 15-Scene's 300,000 spatially augmented RootSIFT (K=64, PCA-64 + 2):
    # scikit-learn's float32 EM stops with "ill-defined empirical covariance".
    import vladkit.vocabulary.gmm as module

    calls = []

    class Float32Fails(module.GaussianMixture):
        def fit(self, X, y=None):
            calls.append((X.dtype, len(X)))
            if X.dtype == np.float32:
                raise ValueError("Fitting the mixture model failed because some components have "
                                 "ill-defined empirical covariance (for instance ...)")
            return super().fit(X, y)

    monkeypatch.setattr(module, "GaussianMixture", Float32Fails)
    X = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)
    vocab = GMMVocabulary(3, random_state=0).fit(X)
    # the float64 retry runs on half the rows (seeded), so its memory is the float32 fit's
    assert calls == [(np.float32, 500), (np.float64, 250)] and vocab.means_.dtype == np.float32
    assert np.isfinite(vocab.means_).all() and vocab.n_components == 3
    calls.clear()
    again = GMMVocabulary(3, random_state=0).fit(X)
    np.testing.assert_array_equal(again.means_, vocab.means_)
    # few rows: never fewer than 2 per component (of 8 rows and 3 components, 6)
    calls.clear()
    GMMVocabulary(3, random_state=0).fit(X[:8])
    assert calls == [(np.float32, 8), (np.float64, 6)]
    monkeypatch.setattr(module, "GaussianMixture", type("Other", (module.GaussianMixture,), {
        "fit": lambda self, X, y=None: (_ for _ in ()).throw(ValueError("something else"))}))
    with pytest.raises(ValueError, match="something else"):
        GMMVocabulary(3, random_state=0).fit(X)


# ------------------------------------------------------------- the spatial Fisher vector


@pytest.mark.parametrize("options", [{}, {"improved": False, "power": None, "l2": False}, {"include_weights": True}],
                         ids=["improved", "raw", "weights"])
def test_spatial_fisher_vector_matches_the_numpy_reference(augmented, options):
    encoder = FisherEncoder(8, pca=16, passthrough_dims=2, max_descriptors=5000, random_state=0,
                            **options).fit(augmented)
    vocab = encoder.vocabulary_
    assert vocab.dim_ == 18 and encoder.n_features_out_ == 2 * 8 * 18 + (8 if options.get("include_weights") else 0)
    vectors = encoder.transform(augmented)
    for features, vector in zip(augmented, vectors):
        # [PCA(appearance), positions], each part computed on its own
        appearance = features.descriptors[:, :128].astype(np.float64)
        reduced = (appearance - vocab.pca_mean_[:128]) @ vocab.pca_components_[:16, :128].T.astype(np.float64)
        X = np.hstack([reduced, expected_columns(features, 1.0)])
        expected = ref.fisher(X, vocab.means_, vocab.covariances_, vocab.weights_, **options)
        scale = max(np.abs(expected).max(), 1e-12)
        np.testing.assert_allclose(vector, expected, rtol=0, atol=2e-5 * scale)
    assert np.any(vectors[:, [k * 18 + 16 for k in range(8)]])  # the position gradients are there


def test_pca_auto_leaves_out_the_passed_through_dimensions(augmented):
    fisher = FisherEncoder(4, passthrough_dims=2, max_descriptors=3000, random_state=0).fit(augmented)
    assert fisher.vocabulary_.pca == 64 and fisher.vocabulary_.dim_ == 66 and fisher.n_features_out_ == 2 * 4 * 66
    small = [np.hstack([f.descriptors[:, :62], f.descriptors[:, 128:]]) for f in augmented]  # 62 + 2: no PCA
    assert FisherEncoder(4, passthrough_dims=2, max_descriptors=3000, random_state=0).fit(small).vocabulary_.pca is None


def test_empty_sets_give_zero_vectors(augmented):
    empty = augment_positions(LocalFeatures(np.zeros((0, 128), np.float32), np.zeros((0, 2), np.float32),
                                            np.zeros(0, np.float32), (0, 0)))
    for encoder in (FisherEncoder(4, pca=8, passthrough_dims=2, max_descriptors=3000, random_state=0),
                    VLADEncoder(4, random_state=0, max_descriptors=3000),
                    BoFEncoder(4, random_state=0, max_descriptors=3000)):
        vectors = encoder.fit(augmented).transform([empty, augmented[0]])
        assert not np.any(vectors[0]) and np.any(vectors[1])


def test_kmeans_encoders_take_augmented_descriptors(augmented):
    vlad = VLADEncoder(8, random_state=0, max_descriptors=5000).fit(augmented)
    assert vlad.transform(augmented).shape == (6, 8 * 130)
    words = KMeansVocabulary(8, pca=32, passthrough_dims=2, random_state=0, max_descriptors=5000).fit(augmented)
    vlad = VLADEncoder(vocabulary=words).fit(augmented)
    vectors = vlad.transform(augmented)
    assert vectors.shape == (6, 8 * 34) and np.all(np.isfinite(vectors))
    hist = BoFEncoder(vocabulary=words).fit(augmented).transform(augmented)
    np.testing.assert_allclose(np.linalg.norm(hist, axis=1), 1, rtol=1e-6)


def test_pyramid_of_augmented_descriptors(augmented):
    fisher = FisherEncoder(4, pca=8, passthrough_dims=2, max_descriptors=3000, random_state=0)
    pyramid = SpatialPyramid(fisher, levels=((1, 1), (2, 2)), l2=False).fit(augmented)
    vectors = pyramid.transform(augmented)
    block = pyramid.encoder_.n_features_out_
    assert block == 2 * 4 * 10 and vectors.shape == (6, 5 * block)
    np.testing.assert_allclose(vectors[:, :block], pyramid.encoder_.transform(augmented), atol=1e-6)
    # a cell's vector is the one of its descriptors alone (positions and all)
    from vladkit.encoders.pyramid import cell_masks

    mask = cell_masks(augmented[0], ((1, 1), (2, 2)))[1]
    alone = pyramid.encoder_.transform([augmented[0].descriptors[mask]])[0]
    np.testing.assert_allclose(vectors[0, block:2 * block], alone, atol=1e-6)


# -------------------------------------------------------------- pipelines and ImageEncoder


def test_pipeline_and_image_encoder(scene15_images):
    pipeline = make_pipeline(DenseSIFT(step=6, root=True), SpatialAugmentation(),
                             FisherEncoder(4, pca=16, passthrough_dims=2, max_descriptors=5000, random_state=0))
    vectors = pipeline.fit_transform(scene15_images)
    assert vectors.shape == (6, 2 * 4 * 18)
    vocab = pipeline[-1].vocabulary_
    extractor = DenseSIFT(step=6, root=True, spatial_augmentation=1.0)
    streamed = ImageEncoder(extractor, FisherEncoder(vocabulary=vocab), batch_size=2).fit(scene15_images)
    np.testing.assert_allclose(streamed.transform(scene15_images), vectors, atol=1e-6)
    # ImageEncoder trains its own vocabulary on augmented descriptors too, with a pyramid
    model = ImageEncoder(extractor, SpatialPyramid(FisherEncoder(4, pca=16, passthrough_dims=2, random_state=0),
                                                   levels=((1, 1), (1, 2))),
                         batch_size=3, max_descriptors=5000, random_state=0).fit(scene15_images)
    assert model.encoder_.encoder_.vocabulary_.pca_components_.shape == (18, 130)
    out = model.transform(scene15_images)
    features = extractor.transform(scene15_images)
    np.testing.assert_allclose(out, model.encoder_.transform(features), atol=1e-6)


# ------------------------------------------------------------------ recipes and files


def test_recipe_round_trips(scene15_images, tmp_path):
    extractor = DenseSIFT(step=6, root=True, spatial_augmentation=1.5)
    text = describe_extractor(extractor)
    assert "spatial_augmentation=1.5" in text
    assert parse_extractor(text) == ("DenseSIFT", {**{k: v for k, v in extractor.get_params().items()
                                                     if k not in ("n_jobs", "max_pixels", "on_error")}})
    assert "spatial_augmentation" not in describe_extractor(DenseSIFT(step=6))  # plain: as before
    paths = []
    for i, image in enumerate(scene15_images):
        paths.append(str(tmp_path / f"img{i}.png"))
        cv2.imwrite(paths[-1], image)
    vocab = GMMVocabulary(4, pca=16, passthrough_dims=2, max_descriptors=5000, random_state=0,
                          descriptor_type=text).fit(extractor.transform(paths))
    vocab.save(tmp_path / "gmm.npz")
    recipe = Recipe.make(extractor, tmp_path / "gmm.npz")
    assert recipe.extractor_params["spatial_augmentation"] == 1.5 and "passthrough_dims" not in recipe.encoder_params
    built_extractor, encoder = recipe.build(n_jobs=1)
    vectors = encoder.transform(built_extractor.transform(paths))
    EncodedImages(vectors, paths, recipe).save(tmp_path / "enc.npz")
    loaded = load_encodings(tmp_path / "enc.npz")
    assert loaded.recipe == recipe
    query_extractor, query_encoder = loaded.recipe.build(n_jobs=1)
    assert query_extractor.spatial_augmentation == 1.5
    # Equal up to float32 rounding: two images are a smaller matrix product than the whole
    # set, and OpenBLAS accumulates small products in another order (measured: 3e-8).
    np.testing.assert_allclose(query_encoder.transform(query_extractor.transform(paths[:2])), vectors[:2],
                               rtol=0, atol=1e-6)
    # the sharded encode job (what `vladkit encode` runs) gives the same vectors
    result = encode_images(paths, recipe, tmp_path / "job", batch_size=4, n_jobs=1)
    np.testing.assert_allclose(result.encodings.vectors, vectors, atol=1e-6)


# ------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, scene15_images):
    folder = tmp_path_factory.mktemp("spatial-cli")
    for i, image in enumerate(scene15_images):
        assert cv2.imwrite(str(folder / f"img{i}.png"), image)
    return folder


def test_cli_builds_and_encodes_with_spatial(image_folder, tmp_path):
    vocab_path, enc_path = tmp_path / "gmm.npz", tmp_path / "enc.npz"
    code, out, err = cli("vocab", "build", image_folder, "-k", 4, "--kind", "gmm", "--root", "--step", 8,
                         "--spatial", "--max-descriptors", 2000, "-q", "-o", vocab_path)
    assert code == 0, err
    assert "words of dimension 66" in out
    vocab = load_vocabulary(vocab_path)
    assert vocab.passthrough_dims == 2 and vocab.pca == 64 and vocab.pca_components_.shape == (66, 130)
    assert "spatial_augmentation=1.0" in vocab.descriptor_type
    code, out, err = cli("vocab", "info", vocab_path)
    assert code == 0 and "64 components, the last 2 dimensions kept as they are" in out
    code, out, err = cli("encode", image_folder, "--vocab", vocab_path, "-q", "-o", enc_path)
    assert code == 0, err
    encodings = load_encodings(enc_path)
    assert encodings.recipe.extractor_params["spatial_augmentation"] == 1.0 and encodings.dim == 2 * 4 * 66
    extractor, encoder = encodings.recipe.build(n_jobs=1)
    np.testing.assert_allclose(encodings.vectors, encoder.transform(extractor.transform(encodings.ids)), atol=1e-6)


def test_cli_spatial_scale_and_mismatches(image_folder, tmp_path):
    scaled = tmp_path / "words.npz"
    code, out, err = cli("vocab", "build", image_folder, "-k", 4, "--step", 8, "--spatial-scale", 2,
                         "--max-descriptors", 3000, "-q", "-o", scaled)
    assert code == 0, err
    vocab = load_vocabulary(scaled)
    assert "spatial_augmentation=2.0" in vocab.descriptor_type and vocab.centers_.shape == (4, 130)
    code, _, err = cli("encode", image_folder, "--vocab", scaled, "--spatial-scale", 3, "-q", "-o", tmp_path / "e.npz")
    assert code == 0, err
    assert load_encodings(tmp_path / "e.npz").recipe.extractor_params["spatial_augmentation"] == 3.0
    plain = tmp_path / "plain.npz"
    assert cli("vocab", "build", image_folder, "-k", 4, "--step", 8, "--max-descriptors", 3000, "-q",
               "-o", plain)[0] == 0
    code, _, err = cli("encode", image_folder, "--vocab", plain, "--spatial", "-q", "-o", tmp_path / "x.npz")
    assert code == 2 and "without --spatial" in err and not (tmp_path / "x.npz").exists()
    code, _, err = cli("encode", image_folder, "--vocab", scaled, "--features", "sift", "-q", "-o", tmp_path / "y.npz")
    assert code == 2 and "add --spatial" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = cli("vocab", "build", image_folder, "--spatial-scale", 0, "-o", tmp_path / "z.npz")
    assert code == 2 and "positive number" in err
