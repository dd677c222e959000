import tracemalloc

import cv2
import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

from conftest import textured_image
from test_pipelines import stripes
from vladkit import (
    BoFEncoder,
    DenseSIFT,
    FisherEncoder,
    ImageEncoder,
    LocalFeatures,
    SpatialPyramid,
    VLADEncoder,
)
from vladkit.encoders.normalize import l2_normalize


@pytest.fixture(scope="module")
def images():
    return [textured_image(i, (80 + 4 * (i % 5), 96)) for i in range(11)]


def test_streaming_equals_list_path(images):
    extractor = DenseSIFT(step=8, sizes=(4, 8), root=True)
    streaming = ImageEncoder(extractor, VLADEncoder(8, random_state=0), batch_size=3,
                             max_descriptors=2000, random_state=0).fit(images)
    listed = streaming.encoder_.transform(extractor.transform(images))
    np.testing.assert_array_equal(streaming.transform(images), listed)
    assert streaming.transform(images).shape == (11, 8 * 128)
    assert streaming.encoder_.vocabulary_.n_training_descriptors_ <= 2000


def test_fit_sample_is_bounded_and_reproducible(images):
    make = lambda: ImageEncoder(DenseSIFT(step=8), BoFEncoder(6, random_state=0), batch_size=4,
                                max_descriptors=500, random_state=3)
    a, b = make().fit(images), make().fit(images)
    np.testing.assert_array_equal(a.encoder_.vocabulary_.centers_, b.encoder_.vocabulary_.centers_)
    assert a.encoder_.vocabulary_.n_training_descriptors_ <= 11 * 46  # ceil(500 / 11) per image


class _CountingDenseSIFT(DenseSIFT):
    """DenseSIFT recording how many images it extracts (the passes over the dataset)."""

    extracted = []

    def transform(self, X):
        X = list(X)
        self.extracted.append(len(X))
        return super().transform(X)


def _reference_idf(vocabulary, features):
    """Smoothed idf of the words over whole images: df_k = images with a descriptor whose
    nearest word (float64, plain numpy) is k."""
    centers = vocabulary.centers_.astype(np.float64)
    df = np.zeros(len(centers))
    for item in features:
        X = vocabulary.project(item.descriptors).astype(np.float64)
        nearest = ((X[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        df[np.unique(nearest)] += 1
    return np.log((1 + len(features)) / (1 + df)) + 1


@pytest.mark.parametrize("pyramid", [False, True], ids=["bof", "pyramid"])
def test_tf_idf_is_learnt_from_whole_images(images, pyramid):
    # The encoder is fitted on ~10 descriptors per image (of ~100): the idf must still
    # be that of the whole images, as BoFEncoder.fit on all their descriptors gives.
    wrap = (lambda e: SpatialPyramid(e, levels=((1, 1), (2, 2)))) if pyramid else (lambda e: e)
    inner = lambda model: model.encoder_.encoder_ if pyramid else model.encoder_
    extractor = _CountingDenseSIFT(step=8, sizes=(4, 8))
    _CountingDenseSIFT.extracted.clear()
    model = ImageEncoder(extractor, wrap(BoFEncoder(40, tf_idf=True, random_state=0)), batch_size=4,
                         max_descriptors=110, random_state=0).fit(images)
    passes = sum(_CountingDenseSIFT.extracted) / len(images)
    features = DenseSIFT(step=8, sizes=(4, 8)).transform(images)
    vocabulary = inner(model).vocabulary_
    assert vocabulary.n_training_descriptors_ <= 110 < sum(len(f.descriptors) for f in features) / 5
    idf = _reference_idf(vocabulary, features)
    assert len(np.unique(idf)) > 2  # rare and common words: a test that can fail
    np.testing.assert_allclose(inner(model).idf_, idf, rtol=1e-12)
    whole = BoFEncoder(vocabulary=vocabulary, tf_idf=True).fit(features)
    np.testing.assert_array_equal(inner(model).idf_, whole.idf_)
    assert passes == 2  # the sample's pass, then the counting's

    # A trained vocabulary and hard assignment: counted in the single pass, same idf.
    _CountingDenseSIFT.extracted.clear()
    given = ImageEncoder(extractor, wrap(BoFEncoder(vocabulary=vocabulary, tf_idf=True)), batch_size=4,
                         max_descriptors=110, random_state=0).fit(images)
    assert sum(_CountingDenseSIFT.extracted) == len(images)
    np.testing.assert_array_equal(inner(given).vocabulary_.centers_, vocabulary.centers_)
    np.testing.assert_array_equal(inner(given).idf_, idf)
    np.testing.assert_array_equal(given.transform(images), model.transform(images))


def _manual_pyramid(encoder, features, levels):
    h, w = features.image_shape
    blocks = []
    for nx, ny in levels:
        for row in range(ny):
            for column in range(nx):
                x, y = features.positions[:, 0], features.positions[:, 1]
                # Cells cut on pixel edges: a centre x is in column floor((x + 0.5) n / w).
                inside = ((np.minimum(np.floor((x + 0.5) * nx / w).astype(int), nx - 1) == column)
                          & (np.minimum(np.floor((y + 0.5) * ny / h).astype(int), ny - 1) == row))
                blocks.append(encoder.transform([features.descriptors[inside]])[0])
    return l2_normalize(np.concatenate(blocks)[None].astype(np.float64))[0]


@pytest.mark.parametrize("encoder", [VLADEncoder(6, random_state=0), FisherEncoder(4, random_state=0),
                                     BoFEncoder(10, random_state=0)], ids=["vlad", "fisher", "bof"])
def test_spatial_pyramid_encodes_each_cell(images, encoder):
    features = DenseSIFT(step=8, sizes=(4, 8)).transform(images[:4])
    levels = ((1, 1), (2, 2), (1, 3))
    pyramid = SpatialPyramid(encoder, levels=levels).fit(features)
    out = pyramid.transform(features)
    dim = pyramid.encoder_.n_features_out_
    assert out.shape == (4, 8 * dim) and pyramid.n_features_out_ == 8 * dim
    for item, row in zip(features, out):
        # float32, and a signed square root that amplifies round-off near 0: 1e-5
        np.testing.assert_allclose(row, _manual_pyramid(pyramid.encoder_, item, levels), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    names = pyramid.get_feature_names_out()
    assert len(names) == out.shape[1] and names[dim].startswith("spm2x2_r0c0_")


def test_spatial_pyramid_empty_cells_and_bad_input():
    features = LocalFeatures(np.random.default_rng(0).random((5, 16), dtype=np.float32),
                             np.array([[1, 1], [2, 2], [3, 1], [1, 3], [2, 1]], np.float32),
                             np.ones(5, np.float32), (40, 40))  # all in the top-left corner
    pyramid = SpatialPyramid(VLADEncoder(2, random_state=0), levels=((1, 1), (2, 2))).fit([features] * 3)
    out = pyramid.transform([features])
    blocks = out.reshape(5, -1)
    assert blocks[0].any() and blocks[1].any() and not blocks[2:].any() and np.isfinite(out).all()
    with pytest.raises(TypeError, match="needs LocalFeatures"):
        pyramid.transform([features.descriptors])
    with pytest.raises(ValueError, match="levels"):
        SpatialPyramid(VLADEncoder(2), levels=((0, 1),)).fit([features])


def test_one_line_classifier_from_images():
    train = [textured_image(200 + i) for i in range(12)] + [stripes(100 + i) for i in range(12)]
    labels = np.array([0] * 12 + [1] * 12)
    test = [textured_image(300 + i) for i in range(5)] + [stripes(200 + i) for i in range(5)]
    classifier = make_pipeline(
        ImageEncoder(DenseSIFT(step=6, root=True),
                     SpatialPyramid(FisherEncoder(4, pca=24, random_state=0), levels=((1, 1), (2, 2))),
                     batch_size=5, max_descriptors=5000, random_state=0),
        LinearSVC(),
    )
    classifier.fit(train, labels)
    assert np.mean(classifier.predict(test) == np.array([0] * 5 + [1] * 5)) >= 0.9


def _traced_peak(function):
    """Peak of the memory traced by tracemalloc (numpy's buffers included) during a call."""
    tracemalloc.start()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


def test_transform_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # 2,000 image files: distinct crops of one textured picture.
    picture = textured_image(7, (400, 400))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2000):
        y, x = rng.integers(0, 400 - 64, size=2)
        paths.append(tmp_path / f"{i:04d}.png")
        cv2.imwrite(str(paths[-1]), picture[y:y + 64, x:x + 64])
    batch_size = 50
    model = ImageEncoder(DenseSIFT(step=6, sizes=(4, 8), root=True), VLADEncoder(16, random_state=0),
                         batch_size=batch_size, max_descriptors=5000, random_state=0).fit(paths[:100])
    descriptors_per_image = len(model.extractor_.transform(paths[:1])[0].descriptors)

    peak_small, out_small = _traced_peak(lambda: model.transform(paths[:200]))
    peak_large, out_large = _traced_peak(lambda: model.transform(paths))
    working_small = peak_small - out_small.nbytes
    working_large = peak_large - out_large.nbytes

    print(f"working memory: 200 images {working_small / 1e6:.1f} MB, 2,000 images {working_large / 1e6:.1f} MB, "
          f"one batch of descriptors {batch_size * descriptors_per_image * 512 / 1e6:.1f} MB")
    # The measurement sees the batch: at least one batch of descriptors is traced...
    one_batch = batch_size * descriptors_per_image * 128 * 4
    assert working_small >= one_batch
    # ...and 10x the images costs no more working memory (all 2,000 images' descriptors
    # at once would be 40x a batch).
    assert working_large <= 1.25 * working_small, (working_small, working_large)
    np.testing.assert_array_equal(out_large[:200], out_small)
