"""scikit-learn's own estimator checks on vladkit's estimators.

``PCAWhitening`` and the vocabularies (given one pooled ``(N, D)`` array) take 2-D
arrays: every check of ``parametrize_with_checks`` runs on them. The encoders, the
extractors and ``ImageEncoder`` take lists (descriptor sets, images) and declare it in
their input tags (``two_d_array=False``), so scikit-learn runs only the checks that need
no 2-D data; the data-free API checks scikit-learn does not yield for them are run
explicitly below, and the tests at the end check that the tags tell the truth.
"""

import warnings

import cv2
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError, SkipTestWarning
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import (
    check_do_not_raise_errors_in_init_or_set_params,
    check_estimator_cloneable,
    check_estimator_repr,
    check_estimator_tags_renamed,
    check_get_params_invariance,
    check_mixin_order,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
    check_valid_tag_types,
    parametrize_with_checks,
)

from conftest import textured_image
from vladkit import (
    SIFT,
    BoFEncoder,
    DenseSIFT,
    FisherEncoder,
    GMMVocabulary,
    ImageEncoder,
    KMeansVocabulary,
    LLCEncoder,
    NetVLADEncoder,
    PCAWhitening,
    SpatialPyramid,
    SuperVectorEncoder,
    VLADEncoder,
    load_vocabulary,
)
from vladkit.encoders import NetVLADParams


def _netvlad_params(n_clusters=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return NetVLADParams(rng.standard_normal((n_clusters, dim)), rng.standard_normal(n_clusters),
                         rng.standard_normal((n_clusters, dim)))


# Small sizes: the checks fit on a few dozen rows of 1 to 10 features.
TWO_D_ESTIMATORS = [
    PCAWhitening(n_components=2),
    KMeansVocabulary(n_clusters=3, random_state=0),
    GMMVocabulary(n_components=3, random_state=0),
]
LIST_ESTIMATORS = [
    BoFEncoder(n_clusters=3, random_state=0),
    VLADEncoder(n_clusters=3, random_state=0),
    FisherEncoder(n_components=3, random_state=0),
    NetVLADEncoder(_netvlad_params()),
    SpatialPyramid(VLADEncoder(n_clusters=3, random_state=0)),
    LLCEncoder(n_clusters=3, random_state=0),
    SuperVectorEncoder(n_clusters=3, random_state=0),
    SIFT(),
    DenseSIFT(),
    ImageEncoder(DenseSIFT(step=8), VLADEncoder(n_clusters=3, random_state=0)),
]


with warnings.catch_warnings():
    # "Can't test estimator ... which requires input of type ...": scikit-learn skipping
    # the data checks of the list-input estimators, as their tags ask (asserted below).
    warnings.simplefilter("ignore", SkipTestWarning)
    _all_sklearn_checks = parametrize_with_checks(TWO_D_ESTIMATORS + LIST_ESTIMATORS)


@_all_sklearn_checks
def test_sklearn_estimator_checks(estimator, check):
    # No check is expected to fail: no expected_failed_checks.
    check(estimator)


def test_list_estimators_are_recognised_as_such():
    # Why parametrize_with_checks yields only check_estimator_cloneable for them.
    for estimator in LIST_ESTIMATORS:
        assert not get_tags(estimator).input_tags.two_d_array, type(estimator).__name__
    for estimator in TWO_D_ESTIMATORS:
        assert get_tags(estimator).input_tags.two_d_array


DATA_FREE_CHECKS = [
    check_estimator_cloneable,
    check_estimator_repr,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_get_params_invariance,
    check_set_params,
    check_do_not_raise_errors_in_init_or_set_params,
    check_mixin_order,
    check_valid_tag_types,
    check_estimator_tags_renamed,
]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS, ids=lambda check: check.__name__)
@pytest.mark.parametrize("estimator", TWO_D_ESTIMATORS + LIST_ESTIMATORS,
                         ids=lambda estimator: type(estimator).__name__)
def test_data_free_api_checks(estimator, check):
    """The API checks that need no data, which scikit-learn skips with the data checks
    for estimators without 2-D input (and some of which check_estimator never yields)."""
    check(type(estimator).__name__, clone(estimator))


# ------------------------------------------------------------------ 2-D conventions


def test_vocabulary_pooled_array_list_of_rows_and_one_image_agree(tmp_path):
    X = np.random.default_rng(0).standard_normal((200, 5))
    reference = KMeansVocabulary(3, random_state=0).fit(X)
    reference.save(tmp_path / "words.npz")
    assert load_vocabulary(tmp_path / "words.npz").n_features_in_ == 5
    for same in (X.tolist(), [X]):  # a list of rows is one array; [X] is one image
        np.testing.assert_array_equal(KMeansVocabulary(3, random_state=0).fit(same).centers_,
                                      reference.centers_)
    assert reference.n_features_in_ == 5
    assert list(reference.get_feature_names_out()) == ["kmeansvocabulary0", "kmeansvocabulary1",
                                                       "kmeansvocabulary2"]


def test_vocabulary_fitted_on_sets_forgets_column_names():
    X = np.random.default_rng(1).standard_normal((120, 4))
    vocab = GMMVocabulary(2, random_state=0)
    vocab.feature_names_in_ = np.array(list("abcd"), dtype=object)  # as after a DataFrame
    vocab.fit([X[:60], X[60:]])  # per-image sets have no column names
    assert not hasattr(vocab, "feature_names_in_") and vocab.n_features_in_ == 4


def test_pcawhitening_tags_say_float32_out():
    X = np.random.default_rng(2).standard_normal((30, 6))
    assert get_tags(PCAWhitening(2)).transformer_tags.preserves_dtype == ["float32"]
    for dtype in (np.float32, np.float64, np.int64):
        assert PCAWhitening(2).fit(X.astype(dtype)).transform(X.astype(dtype)).dtype == np.float32


# ------------------------------------------------------- list-input tags are truthful


@pytest.fixture(scope="module")
def descriptor_sets():
    rng = np.random.default_rng(3)
    return [rng.standard_normal((40, 8)).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("estimator", LIST_ESTIMATORS[:4] + LIST_ESTIMATORS[5:7],
                         ids=lambda estimator: type(estimator).__name__)
def test_encoders_take_what_their_tags_declare(estimator, descriptor_sets):
    tags = get_tags(estimator)
    assert (tags.input_tags.two_d_array, tags.input_tags.three_d_array) == (False, True)
    assert tags.requires_fit and tags.transformer_tags.preserves_dtype == ["float32"]
    with pytest.raises(NotFittedError):
        clone(estimator).transform(descriptor_sets)
    encoder = clone(estimator).fit(descriptor_sets)
    out = encoder.transform(descriptor_sets)
    assert out.dtype == np.float32 and out.shape == (4, encoder.n_features_out_)
    assert len(encoder.get_feature_names_out()) == encoder.n_features_out_
    # three_d_array: equal-sized sets stacked in one array are the same images.
    np.testing.assert_array_equal(encoder.transform(np.stack(descriptor_sets)), out)
    # float64 descriptors: float32 vectors too (preserves_dtype is float32 only).
    assert encoder.transform([s.astype(np.float64) for s in descriptor_sets]).dtype == np.float32
    # two_d_array=False: one 2-D array is refused, not read as rows of one image.
    with pytest.raises(TypeError, match="one descriptor set per image"):
        encoder.transform(descriptor_sets[0])


def test_spatial_pyramid_takes_local_features(make_textured):
    tags = get_tags(LIST_ESTIMATORS[4])
    assert (tags.input_tags.two_d_array, tags.input_tags.three_d_array) == (False, False)
    features = DenseSIFT(step=8).transform([make_textured(seed) for seed in range(3)])
    pyramid = clone(LIST_ESTIMATORS[4]).fit(features)
    assert pyramid.transform(features).shape == (3, pyramid.n_features_out_)


@pytest.mark.parametrize("extractor", [SIFT(), DenseSIFT(step=8)], ids=["SIFT", "DenseSIFT"])
def test_extractors_take_what_their_tags_declare(extractor, tmp_path):
    tags = get_tags(extractor)
    assert not tags.requires_fit and not tags.input_tags.two_d_array
    assert tags.input_tags.three_d_array and tags.input_tags.string
    images = [textured_image(seed) for seed in range(2)]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"{index}.png"))
        assert cv2.imwrite(paths[-1], image)
    reference = extractor.transform(images)  # requires_fit=False: no fit needed
    # string: a list of paths; three_d_array: a stack of grey images.
    for same in (paths, np.stack(images)):
        for a, b in zip(extractor.transform(same), reference):
            np.testing.assert_array_equal(a.descriptors, b.descriptors)
    with pytest.raises(TypeError, match="list of images"):
        extractor.transform(images[0])  # one 2-D image is not a list of images


def test_image_encoder_takes_paths_and_stacks(tmp_path):
    tags = get_tags(LIST_ESTIMATORS[-1])
    assert tags.input_tags.string and tags.input_tags.three_d_array and not tags.input_tags.two_d_array
    images = [textured_image(seed, shape=(64, 64)) for seed in range(3)]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"{index}.png"))
        assert cv2.imwrite(paths[-1], image)
    encoder = clone(LIST_ESTIMATORS[-1]).fit(paths)
    out = encoder.transform(paths)
    assert out.dtype == np.float32
    np.testing.assert_allclose(encoder.transform(np.stack(images)), out, atol=1e-6)
