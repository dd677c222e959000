"""Several vocabularies, one vector: the multi-vocabulary VLAD of Jégou & Chum (ECCV 2012)."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils.validation import check_is_fitted

from ._base import descriptor_sets, encode_whole, work_dtype


class MultiVocabulary(TransformerMixin, BaseEstimator):
    """Encode with several encoders (e.g. VLAD on k-means vocabularies of different seeds)
    and concatenate their vectors, each scaled by 1/sqrt(m).

    Jégou & Chum ("Negative evidences and co-occurrences in image retrieval", ECCV 2012)
    train m vocabularies with different seeds, encode with each, concatenate, and then
    reduce the whole with one PCA-whitening learnt on the concatenation (use
    :class:`vladkit.PCAWhitening` or ``vladkit index build --pca D``): the vocabularies'
    quantisation noise is partly independent, and the joint whitening exploits what they
    share. On its own the concatenation changes little; the joint reduction is the point.

    With the encoders' vectors v_1..v_m (each unit-norm, as VLAD and Fisher vectors are),
    the output is ``[v_1, ..., v_m] / sqrt(m)``, unit-norm too.

    Parameters
    ----------
    encoders : list of encoders
        BoF, VLAD, Fisher or NetVLAD encoders (or spatial pyramids), fitted by ``fit``
        (clones). Give each its own vocabulary or ``random_state`` to make them differ,
        e.g. ``[VLADEncoder(64, random_state=seed) for seed in range(4)]``, which
        ``MultiVocabulary.with_seeds(VLADEncoder(64), range(4))`` builds.

    Attributes
    ----------
    encoders_ : list of fitted encoders
    n_features_out_ : int
    """

    def __init__(self, encoders):
        self.encoders = encoders

    @classmethod
    def with_seeds(cls, encoder, seeds):
        """One clone of ``encoder`` per seed (its ``random_state``, which seeds its
        vocabulary's training)."""
        return cls([clone(encoder).set_params(random_state=int(seed)) for seed in seeds])

    def _check_encoders(self):
        encoders = list(self.encoders) if not isinstance(self.encoders, (str, bytes)) else []
        if not encoders or not all(hasattr(e, "fit") and hasattr(e, "transform") for e in encoders):
            raise ValueError(f"encoders must be a non-empty list of encoders, got {self.encoders!r}")
        return encoders

    def fit(self, X, y=None):
        """Fit a clone of every encoder on X (a list of descriptor sets or LocalFeatures)."""
        X = list(X)
        self.encoders_ = [clone(encoder).fit(X) for encoder in self._check_encoders()]
        self.n_features_out_ = sum(e.n_features_out_ for e in self.encoders_)
        return self

    def transform(self, X):
        """``(n_images, n_features_out_)`` float32: the scaled concatenation."""
        check_is_fitted(self, "encoders_")
        X = list(X)
        limits = [e._float32_limit for e in self.encoders_ if getattr(e, "_float32_limit", None)]
        dtype = work_dtype(descriptor_sets(X), min(limits) if limits else None)  # also validates
        return encode_whole(self, X, dtype)

    def _accumulate(self, n_images, dtype=np.float32):
        return MultiAccumulation(self, n_images, dtype)

    def _thread_limits(self):
        return self.encoders_[0]._thread_limits()

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "encoders_")
        return np.asarray([f"voc{i}_{name}" for i, encoder in enumerate(self.encoders_)
                           for name in encoder.get_feature_names_out()], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # a list of descriptor sets, as the encoders take
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


class MultiAccumulation:
    """Every encoder's accumulation, fed the same descriptors (whole images or pieces)."""

    def __init__(self, multi, n_images, dtype):
        self.parts = [encoder._accumulate(n_images, dtype) for encoder in multi.encoders_]

    def add(self, image, features):
        for part in self.parts:
            part.add(image, features)

    def finish(self):
        vectors = np.concatenate([part.finish() for part in self.parts], axis=1)
        vectors *= np.float32(1 / np.sqrt(len(self.parts)))
        return vectors

