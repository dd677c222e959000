"""Encoders inside scikit-learn: pipelines from images to a classifier, grid search, joblib."""

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from conftest import textured_image
from vladkit import SIFT, FisherEncoder, VLADEncoder


def stripes(seed, shape=(96, 112)):
    """Oriented stripes with noise: a texture unlike textured_image's blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 12)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    image = 0.5 + 0.4 * np.sign(wave) + 0.08 * rng.standard_normal(shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def labelled():
    images = [textured_image(100 + i) for i in range(24)] + [stripes(i) for i in range(24)]
    labels = np.array([0] * 24 + [1] * 24)
    order = np.random.default_rng(0).permutation(48)
    images = [images[i] for i in order]
    labels = labels[order]
    return images[:32], labels[:32], images[32:], labels[32:]


@pytest.mark.parametrize("encoder", [VLADEncoder(n_clusters=16, random_state=0),
                                     FisherEncoder(8, pca=32, random_state=0)],
                         ids=["vlad", "fisher"])
def test_pipeline_from_images_to_classifier(labelled, encoder):
    train_images, train_labels, test_images, test_labels = labelled
    pipeline = make_pipeline(SIFT(root=True), encoder, LinearSVC())
    pipeline.fit(train_images, train_labels)
    predicted = pipeline.predict(test_images)
    assert predicted.shape == test_labels.shape
    assert np.mean(predicted == test_labels) >= 0.85


def test_grid_search_over_vocabulary_size(labelled):
    train_images, train_labels, _, _ = labelled
    features = SIFT().transform(train_images)  # extract once, search over the encoding
    search = GridSearchCV(
        make_pipeline(VLADEncoder(random_state=0), LinearSVC()),
        {"vladencoder__n_clusters": [4, 8]}, cv=2,
    )
    search.fit(features, train_labels)
    assert search.best_params_["vladencoder__n_clusters"] in (4, 8)
    assert len(search.cv_results_["mean_test_score"]) == 2


def test_joblib_round_trip_of_a_fitted_pipeline(labelled, tmp_path):
    train_images, train_labels, test_images, _ = labelled
    pipeline = make_pipeline(SIFT(), VLADEncoder(n_clusters=8, random_state=0)).fit(train_images)
    joblib.dump(pipeline, tmp_path / "pipeline.joblib")
    loaded = joblib.load(tmp_path / "pipeline.joblib")
    np.testing.assert_array_equal(loaded.transform(test_images), pipeline.transform(test_images))


# ------------------------------------------------ a fitted vocabulary given to the encoder


def two_classes(n_images=20, n=60, dim=16, seed=0):
    """Tiny synthetic descriptor sets of two classes (shifted means), and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % 2
    sets = [(rng.normal(0, 1, (n, dim)) + 1.5 * label).astype(np.float32) for label in labels]
    return sets, labels


def test_vocabulary_size_set_on_a_clone_trains_a_copy_and_leaves_the_given_one():
    # Issue 12, finding 7: the clone shared the user's fitted vocabulary, so this set the
    # user's n_clusters to 32 (its centers_ staying 8 x 16) and the clone kept 8 words.
    from sklearn.base import clone

    from vladkit import KMeansVocabulary, SpatialPyramid

    sets, _ = two_classes()
    vocab = KMeansVocabulary(8, random_state=0).fit(sets)
    centers = vocab.centers_.copy()
    encoder = clone(VLADEncoder(vocabulary=vocab)).set_params(vocabulary__n_clusters=32)
    assert vocab.n_clusters == 8
    encoder.fit(sets)
    assert encoder.vocabulary_.n_words_ == 32 and encoder.n_features_out_ == 32 * 16
    assert encoder.transform(sets).shape == (20, 32 * 16)
    # The same without the clone, and through a spatial pyramid: the given object is untouched.
    direct = VLADEncoder(vocabulary=vocab).set_params(vocabulary__n_clusters=16).fit(sets)
    assert direct.vocabulary_.n_words_ == 16
    pyramid = SpatialPyramid(VLADEncoder(vocabulary=vocab), levels=((1, 1),))
    pyramid.set_params(encoder__vocabulary__n_clusters=4).fit(sets)
    assert pyramid.encoder_.vocabulary_.n_words_ == 4
    assert vocab.n_clusters == 8 and vocab.get_params() == KMeansVocabulary(8, random_state=0).get_params()
    np.testing.assert_array_equal(vocab.centers_, centers)
    # A vocabulary parameter with no vocabulary object to set it on says what to do instead.
    with pytest.raises(ValueError, match=r"vocabulary__n_clusters.*vocabulary is None.*n_clusters"):
        VLADEncoder().set_params(vocabulary__n_clusters=8)


def test_grid_search_over_the_size_of_a_given_vocabulary_trains_every_candidate():
    from vladkit import KMeansVocabulary

    sets, labels = two_classes()
    vocab = KMeansVocabulary(8, random_state=0).fit(sets)  # trained on all 20 images
    centers = vocab.centers_.copy()

    def words(pipeline, X, y):
        return pipeline[0].vocabulary_.n_words_

    def trained_on(pipeline, X, y):
        return pipeline[0].vocabulary_.n_training_descriptors_

    search = GridSearchCV(
        make_pipeline(VLADEncoder(vocabulary=vocab), LinearSVC()),
        {"vladencoder__vocabulary__n_clusters": [8, 16]}, cv=2,
        scoring={"words": words, "trained_on": trained_on, "accuracy": "accuracy"}, refit="words",
    )
    search.fit(sets, labels)
    assert list(search.cv_results_["mean_test_words"]) == [8, 16]
    # Every candidate is trained on its own training folds (10 images x 60 descriptors),
    # the one whose size matches the given vocabulary too (not the words it learnt on all).
    assert list(search.cv_results_["mean_test_trained_on"]) == [600, 600]
    assert search.best_estimator_[0].vocabulary_.n_words_ == 16
    assert vocab.n_clusters == 8
    np.testing.assert_array_equal(vocab.centers_, centers)


def test_clone_of_an_encoder_with_a_fitted_vocabulary_encodes_identically_without_training(monkeypatch):
    from sklearn.base import clone

    from vladkit import KMeansVocabulary, SpatialPyramid

    sets, _ = two_classes()
    vocab = KMeansVocabulary(8, random_state=0).fit(sets)
    encoder = VLADEncoder(vocabulary=vocab).fit(sets)
    expected = encoder.transform(sets)

    def no_training(*args, **kwargs):
        raise AssertionError("the given vocabulary was retrained")

    monkeypatch.setattr(KMeansVocabulary, "fit", no_training)
    monkeypatch.setattr(KMeansVocabulary, "fit_sample", no_training)
    cloned = clone(encoder).fit(sets)
    np.testing.assert_array_equal(cloned.transform(sets), expected)
    # Its own copy of the words, not the user's object.
    assert cloned.vocabulary_ is not vocab
    assert not np.shares_memory(cloned.vocabulary_.centers_, vocab.centers_)
    # Settings that do not shape the words keep them, on the copy only.
    tagged = clone(encoder).set_params(vocabulary__descriptor_type="SIFT", vocabulary__n_jobs=1).fit(sets)
    np.testing.assert_array_equal(tagged.transform(sets), expected)
    assert tagged.vocabulary_.descriptor_type == "SIFT" and vocab.descriptor_type is None
    pyramid = SpatialPyramid(encoder, levels=((1, 1),)).fit(sets)
    np.testing.assert_array_equal(pyramid.encoder_.vocabulary_.centers_, vocab.centers_)
