"""k-means visual words (for BoF and VLAD): :class:`KMeansVocabulary`, trained with
scikit-learn's ``KMeans`` or, for large samples, ``MiniBatchKMeans``."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from ..kernels.nearest import nearest_words, squared_distances
from .arrays import _checked_arrays, _fitted_vocabulary
from .base import _check_common, _check_positive_int, _Vocabulary

__all__ = ["KMeansVocabulary"]

#: algorithm="auto" switches from Lloyd's KMeans to MiniBatchKMeans above this many samples.
MINIBATCH_THRESHOLD = 500_000


class KMeansVocabulary(_Vocabulary):
    """k-means visual words (for BoF and VLAD).

    Trained with scikit-learn on at most ``max_descriptors`` descriptors: ``KMeans``
    (Lloyd, k-means++ initialisation) or, for large samples, ``MiniBatchKMeans``.

    Parameters
    ----------
    n_clusters : int, default=64
        Number of visual words K.
    max_descriptors : int, default=200_000
        Training sample size, spread evenly over the images.
    max_per_image : int or None, default=None
        Cap per image (on top of the even spread).
    pca : int or None, default=None
        Reduce descriptors to this many principal components first.
    whiten : bool, default=False
        Divide each principal component by its standard deviation.
    passthrough_dims : int, default=0
        With ``pca``: the last ``passthrough_dims`` descriptor dimensions are left out of
        the PCA (and of whitening) and appended, unchanged, after the ``pca`` components:
        the words have ``pca + passthrough_dims`` dimensions. For spatially augmented
        descriptors (2: the positions, see :mod:`vladkit.features.spatial_augmentation`), whose
        appearance alone is reduced (Sanchez, Perronnin & de Campos 2012). Without
        ``pca`` it changes nothing.
    algorithm : {"auto", "lloyd", "elkan", "minibatch"}, default="auto"
        "auto" is Lloyd up to 500,000 samples and mini-batch above.
    n_init : int, default=1
        Restarts (the best inertia is kept).
    max_iter : int, default=100
        Lloyd iterations (VLFeat's default); for mini-batch, passes over the sample.
    tol : float, default=1e-4
        scikit-learn's convergence tolerance on center movement.
    random_state : int, RandomState or None
        Seeds the sampling and the clustering; an int gives byte-identical vocabularies.
    n_jobs : int or None
        Threads for the clustering (None: all cores).
    descriptor_type : str or None
        Free text saved in the file, e.g. ``"DenseSIFT(root=True)"``.

    Attributes
    ----------
    centers_ : (n_clusters, dim) ndarray
        The words, in the PCA space if ``pca``.
    inertia_ : float
        Sum of squared distances of the training sample to its nearest center.
    n_iter_ : int
    pca_mean_, pca_components_ : ndarrays or None
        The PCA, ``(D,)`` and ``(pca + passthrough_dims, D)``: passed-through dimensions
        have a zero mean and an identity row.
    descriptor_dim_ : int
        Dimension of the descriptors the vocabulary accepts.
    """

    _kind = "kmeans"
    _size_param = "n_clusters"
    _word_arrays = ("centers_",)

    def __init__(self, n_clusters=64, *, max_descriptors=200_000, max_per_image=None, pca=None,
                 whiten=False, passthrough_dims=0, algorithm="auto", n_init=1, max_iter=100, tol=1e-4,
                 random_state=None, n_jobs=None, descriptor_type=None):
        self.n_clusters = n_clusters
        self.max_descriptors = max_descriptors
        self.max_per_image = max_per_image
        self.pca = pca
        self.whiten = whiten
        self.passthrough_dims = passthrough_dims
        self.algorithm = algorithm
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.descriptor_type = descriptor_type

    @classmethod
    def from_centers(cls, centers, *, pca_mean=None, pca_components=None, descriptor_type=None):
        """A fitted vocabulary made from known centers (no training).

        The arrays are checked as :func:`load_vocabulary` checks a file, and copied.

        Parameters
        ----------
        centers : (K, D) array of real numbers
            The words, finite; in the PCA space if a PCA is given.
        pca_mean : (D_in,) array or None
            Mean subtracted from the descriptors before the projection.
        pca_components : (D, D_in) array or None
            Projection applied to the centred descriptors (``project`` computes
            ``(x - pca_mean) @ pca_components.T``); give both PCA arrays or neither.
        descriptor_type : str or None
            Free text saved in the file.

        Returns
        -------
        KMeansVocabulary
            Fitted: ``predict``, ``save`` and the encoders use it as is. Its arrays are
            float32 if every given array is float32, float64 otherwise.

        Raises
        ------
        ValueError
            An array has the wrong shape (the message names it), contains NaN or inf, or
            only one PCA array is given.
        TypeError
            An array is not made of real numbers.
        """
        (centers,), pca = _checked_arrays([("centers", centers, 2)], pca_mean, pca_components)
        return _fitted_vocabulary(cls, {"centers_": centers}, pca, descriptor_type)

    def _validate_params(self):
        _check_positive_int(self, "n_clusters", "max_descriptors", "n_init", "max_iter")
        _check_common(self)
        if self.algorithm not in ("auto", "lloyd", "elkan", "minibatch"):
            raise ValueError(f"algorithm must be 'auto', 'lloyd', 'elkan' or 'minibatch', got {self.algorithm!r}")

    def _fit_words(self, X, seed):
        algorithm = self.algorithm
        if algorithm == "auto":
            algorithm = "minibatch" if len(X) > MINIBATCH_THRESHOLD else "lloyd"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if algorithm == "minibatch":
                model = MiniBatchKMeans(
                    self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                    batch_size=4096, random_state=seed, compute_labels=False,
                )
            else:
                model = KMeans(self.n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                               tol=self.tol, random_state=seed, algorithm=algorithm)
            model.fit(X)
        centers = model.cluster_centers_.astype(X.dtype)
        n_distinct = len(np.unique(centers, axis=0))
        if n_distinct < self.n_clusters or any(
            "distinct clusters" in str(w.message) for w in caught
        ):
            raise ValueError(
                f"the descriptors have fewer distinct values than n_clusters={self.n_clusters} "
                "(e.g. all identical); use fewer clusters or more varied images"
            )
        self.centers_ = np.ascontiguousarray(centers)
        self.n_iter_ = int(model.n_iter_)
        self.inertia_ = float(nearest_words(X.astype(np.float64), self.centers_.astype(np.float64))[1].sum())

    def predict(self, descriptors):
        """Index of the nearest center for each descriptor ((n, D) array) -> (n,) int64."""
        X = self.project(descriptors)
        return nearest_words(X, self.centers_.astype(X.dtype, copy=False))[0]

    def transform(self, descriptors):
        """(n, n_clusters) Euclidean distances to the centers (scikit-learn's KMeans.transform)."""
        X = self.project(descriptors)
        return np.sqrt(squared_distances(X, self.centers_.astype(X.dtype, copy=False)))

    def score(self, descriptors, y=None):
        """Negative sum of squared distances to the nearest center (higher is better)."""
        X = self.project(descriptors)
        return -float(nearest_words(X, self.centers_.astype(X.dtype, copy=False))[1].sum(dtype=np.float64))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Distances come in the input's precision, as KMeans.transform's.
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
