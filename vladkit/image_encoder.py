"""From images straight to vectors, batch by batch: the path for datasets that do not fit
in memory as descriptors (dense SIFT on 15-Scene alone is ~18 GB of float32)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .features import LocalFeatures, _check_images
from .vocabulary import DescriptorSampler

__all__ = ["ImageEncoder"]


class ImageEncoder(TransformerMixin, BaseEstimator):
    """A local-feature extractor and an encoder, streamed over images in batches.

    ``fit`` extracts the images batch by batch and keeps only a bounded sample of each
    image's descriptors (:class:`vladkit.DescriptorSampler`: at most ``max_descriptors`` in
    all, spread over the images), then fits the encoder (its vocabulary, PCA, ...) on the
    sample. ``transform`` extracts and encodes ``batch_size`` images at a time. Peak
    memory is one batch of descriptors plus the output matrix, whatever the number of
    images; the result equals ``encoder.transform(extractor.transform(images))``.

    ``make_pipeline(ImageEncoder(DenseSIFT(root=True), FisherEncoder(64)), LinearSVC())``
    is a classifier from image files.

    Parameters
    ----------
    extractor : SIFT or DenseSIFT
    encoder : BoFEncoder, VLADEncoder, FisherEncoder or SpatialPyramid
    batch_size : int, default=64
        Images extracted and encoded together.
    max_descriptors : int, default=200_000
        Descriptors kept from the training images to fit the encoder.
    max_per_image : int or None, default=None
    random_state : int, RandomState or None
        Seeds the sample (the encoder has its own ``random_state``).

    Attributes
    ----------
    extractor_, encoder_ : fitted clones
    n_features_out_ : int
    """

    def __init__(self, extractor, encoder, *, batch_size=64, max_descriptors=200_000,
                 max_per_image=None, random_state=None):
        self.extractor = extractor
        self.encoder = encoder
        self.batch_size = batch_size
        self.max_descriptors = max_descriptors
        self.max_per_image = max_per_image
        self.random_state = random_state

    def _batches(self, images):
        for start in range(0, len(images), self.batch_size):
            yield start, self.extractor_.transform(images[start:start + self.batch_size])

    def fit(self, X, y=None):
        """Extract a bounded sample of descriptors from the images and fit the encoder.

        Parameters
        ----------
        X : list of images (paths, bytes or arrays)
        y : ignored
        """
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        images = _check_images(X)
        if not images:
            raise ValueError("X holds no images")
        self.extractor_ = clone(self.extractor)
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        sampler = DescriptorSampler(len(images), self.max_descriptors, self.max_per_image, seed)
        kept = []
        for start, features in self._batches(images):
            for offset, item in enumerate(features):
                index = start + offset
                rows = sampler.select(index, len(item))
                # Keep the sampled descriptors with their positions (a spatial pyramid's
                # encoder is fitted on descriptors only, but stays given LocalFeatures).
                kept.append(LocalFeatures(item.descriptors[rows], item.positions[rows],
                                          item.scales[rows], item.image_shape))
        self.encoder_ = clone(self.encoder).fit(kept)
        self.n_features_out_ = self.encoder_.n_features_out_
        return self

    def transform(self, X):
        """Extract and encode the images, ``batch_size`` at a time.

        Returns
        -------
        ndarray (n_images, n_features_out_), float32
        """
        check_is_fitted(self, "encoder_")
        images = _check_images(X)
        out = np.empty((len(images), self.n_features_out_), dtype=np.float32)
        for start, features in self._batches(images):
            out[start:start + len(features)] = self.encoder_.transform(features)
        return out

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "encoder_")
        return self.encoder_.get_feature_names_out()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags
