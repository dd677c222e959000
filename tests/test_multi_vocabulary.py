"""Multi-vocabulary encodings (Jégou & Chum 2012): the scaled concatenation of the single ones."""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

from conftest import textured_image
from vladkit import DenseSIFT, FisherEncoder, ImageEncoder, MultiVocabulary, PCAWhitening, VLADEncoder


def _sets(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 16)).astype(np.float32)
    return [centres[rng.integers(0, 6, 80)] + 0.3 * rng.standard_normal((80, 16)).astype(np.float32)
            for _ in range(n)]


def test_equals_the_scaled_concatenation_of_the_single_encodings():
    train, test = _sets(12), _sets(5, seed=1)
    multi = MultiVocabulary.with_seeds(VLADEncoder(4), [0, 1, 2]).fit(train)
    singles = [VLADEncoder(4, random_state=seed).fit(train) for seed in (0, 1, 2)]
    expected = np.concatenate([s.transform(test) for s in singles], axis=1) / np.sqrt(3)
    np.testing.assert_allclose(multi.transform(test), expected, rtol=0, atol=1e-7)
    assert multi.n_features_out_ == 3 * 4 * 16 and multi.transform(test).dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(multi.transform(test), axis=1), 1, atol=1e-6)
    assert len(multi.get_feature_names_out()) == multi.n_features_out_
    # The vocabularies differ (otherwise the concatenation would only repeat one).
    assert not np.allclose(multi.encoders_[0].vocabulary_.centers_, multi.encoders_[1].vocabulary_.centers_)
    assert clone(multi).get_params()["encoders"][1].random_state == 1


def test_mixed_encoders_stream_through_image_encoder_and_whiten_jointly(make_textured):
    images = [textured_image(700 + i, (96, 128)) for i in range(8)]
    extractor = DenseSIFT(step=8, sizes=(4, 8))
    multi = MultiVocabulary([VLADEncoder(4, random_state=0), FisherEncoder(2, pca=8, random_state=0)])
    streamed = ImageEncoder(extractor, multi, random_state=0).fit(images)
    vectors = streamed.transform(images)
    features = extractor.transform(images)
    direct = streamed.encoder_.transform(features)
    np.testing.assert_allclose(vectors, direct, atol=1e-6)
    assert vectors.shape == (8, 4 * 128 + 2 * 2 * 8)
    reduced = PCAWhitening(5).fit(vectors).transform(vectors)  # the joint reduction
    assert reduced.shape == (8, 5)
