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
