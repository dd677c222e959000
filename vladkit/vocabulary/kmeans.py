"""k-means visual words (for BoF and VLAD): :class:`KMeansVocabulary`, trained with
scikit-learn's ``KMeans`` or, for large samples, ``MiniBatchKMeans``, or, for large
codebooks, faiss's ``Clustering``."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from .._util.blas import load_faiss
from .._util.defaults import (FAISS_MAX_ITER, FAISS_THRESHOLD, MINIBATCH_THRESHOLD,  # noqa: F401 (re-exported)
                              SKLEARN_MAX_ITER)
from .._util.threads import single_threaded_blas
from ..kernels.nearest import nearest_words, squared_distances
from .arrays import _checked_arrays, _fitted_vocabulary
from .base import _check_common, _check_positive_int, _Vocabulary

__all__ = ["KMeansVocabulary"]

ALGORITHMS = ("auto", "lloyd", "elkan", "minibatch", "faiss")


class KMeansVocabulary(_Vocabulary):
    """k-means visual words (for BoF and VLAD).

    Trained on at most ``max_descriptors`` descriptors x_1..x_N: the K centers c_k that
    (locally) minimise the inertia sum_i min_k ||x_i - c_k||^2, by Lloyd's iterations
    (assign each x_i to its nearest center, move each center to the mean of its
    points). Small codebooks are trained with scikit-learn's ``KMeans`` (k-means++
    initialisation) or, for large samples, ``MiniBatchKMeans``; large codebooks
    (``n_clusters >= FAISS_THRESHOLD``, 1024) with faiss's ``Clustering``, several
    times faster there (the assignment is one float32 matrix product per iteration).

    faiss (``algorithm="faiss"``): each of the ``n_init`` runs starts from K training
    descriptors drawn at random without replacement (the first K of a seeded random
    permutation: faiss's initialisation; no k-means++, whose K sequential passes over
    the data cost more than the iterations at K = 16k), then runs exactly ``max_iter`` Lloyd iterations (no tolerance: ``tol``
    is scikit-learn's; faiss stops earlier only if the objective no longer changes).
    A cluster left empty by an iteration takes half of a large cluster (its center is
    copied and both are moved apart by a relative 1/1024), so every word is used.
    Every training descriptor is used (faiss would otherwise subsample to 256 per
    center). The run with the lowest inertia (computed exactly, in float64, on the
    final centers) is kept. Training is in float32 (faiss's only precision); the
    centers are returned in the input's precision. The result is reproducible for the
    same descriptors, ``random_state``, ``n_jobs`` and machine, not across thread
    counts: faiss's BLAS rounds the products differently with another number of
    threads (or on another CPU's kernel), so a descriptor at a near tie can go to the
    other word and the runs drift apart, to another, equally good local optimum
    (measured on 200,000 RootSIFT, K = 256, 1 and 2 threads: the same centers for 2
    iterations, then inertias differing by 1e-5; scikit-learn's differ as much). Give
    ``n_jobs`` explicitly (None: all cores) for the same words on machines with other
    core counts.

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
    algorithm : {"auto", "lloyd", "elkan", "minibatch", "faiss"}, default="auto"
        How the words are trained: scikit-learn's ``KMeans`` ("lloyd", "elkan"), its
        ``MiniBatchKMeans`` ("minibatch"), or faiss's Lloyd iterations ("faiss"). "auto"
        is faiss from ``FAISS_THRESHOLD`` (1024) words on; below, Lloyd up to
        ``MINIBATCH_THRESHOLD`` (500,000) samples and mini-batch above. The algorithm
        used is in ``algorithm_`` and in the saved file.
    n_init : int, default=1
        Restarts from other random initialisations (the best inertia is kept).
    max_iter : int or "auto", default="auto"
        Lloyd iterations: at most this many with scikit-learn (it stops when ``tol`` is
        reached; for mini-batch, passes over the sample), exactly this many with faiss.
        "auto": 100 with scikit-learn (VLFeat's default), 20 with faiss (on 200,000
        RootSIFT at K = 4096, 20 iterations end within 0.1 % of the inertia of 60, at a
        third of the time; 16k words on 482,000 take ~20 s an iteration on 2 cores).
    tol : float, default=1e-4
        scikit-learn's convergence tolerance on center movement (unused by faiss).
    random_state : int, RandomState or None
        Seeds the sampling and the clustering; an int gives byte-identical vocabularies.
    n_jobs : int or None
        Threads for the clustering (None: all cores); with faiss, another thread count
        can give other (equally good) words, see above.
    descriptor_type : str or None
        Free text saved in the file, e.g. ``"DenseSIFT(root=True)"``.

    Attributes
    ----------
    centers_ : (n_clusters, dim) ndarray
        The words, in the PCA space if ``pca``.
    inertia_ : float
        Sum of squared distances of the training sample to its nearest center.
    n_iter_ : int
        Lloyd iterations run (of the kept run).
    algorithm_ : str
        The algorithm that trained the words: "lloyd", "elkan", "minibatch" or "faiss"
        (None for words made by ``from_centers``, or loaded from a file written before
        vladkit recorded it).
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
                 whiten=False, passthrough_dims=0, algorithm="auto", n_init=1, max_iter="auto", tol=1e-4,
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
        vocab = _fitted_vocabulary(cls, {"centers_": centers}, pca, descriptor_type)
        vocab.algorithm_ = None  # not trained
        return vocab

    def _validate_params(self):
        _check_positive_int(self, "n_clusters", "max_descriptors", "n_init")
        if not (isinstance(self.max_iter, str) and self.max_iter == "auto"):
            try:
                _check_positive_int(self, "max_iter")
            except ValueError:
                raise ValueError(f"max_iter must be a positive integer or 'auto', got {self.max_iter!r}") from None
        _check_common(self)
        if self.algorithm not in ALGORITHMS:
            raise ValueError("algorithm must be " + ", ".join(map(repr, ALGORITHMS[:-1]))
                             + f" or {ALGORITHMS[-1]!r}, got {self.algorithm!r}")

    def _algorithm(self, n_samples):
        """The algorithm ``fit`` uses for ``n_samples`` descriptors ("auto" resolved)."""
        if self.algorithm != "auto":
            return self.algorithm
        if self.n_clusters >= FAISS_THRESHOLD:
            return "faiss"
        return "minibatch" if n_samples > MINIBATCH_THRESHOLD else "lloyd"

    def _max_iter(self, algorithm):
        if isinstance(self.max_iter, str):  # "auto"
            return FAISS_MAX_ITER if algorithm == "faiss" else SKLEARN_MAX_ITER
        return int(self.max_iter)

    def fit_sample(self, sample):
        # faiss is loaded before fit_sample's thread limits are set, so that they bound its
        # OpenMP threads too; with the OpenBLAS kernel this CPU supports (vladkit._util.blas).
        self._validate_params()
        if self._algorithm(len(sample)) == "faiss":
            _faiss()
        return super().fit_sample(sample)

    def _fit_words(self, X, seed):
        algorithm = self._algorithm(len(X))
        max_iter = self._max_iter(algorithm)
        if algorithm == "faiss":
            self._fit_faiss(X, seed, max_iter)
            self.algorithm_ = algorithm
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            if algorithm == "minibatch":
                model = MiniBatchKMeans(
                    self.n_clusters, n_init=self.n_init, max_iter=max_iter,
                    batch_size=4096, random_state=seed, compute_labels=False,
                )
            else:
                model = KMeans(self.n_clusters, n_init=self.n_init, max_iter=max_iter,
                               tol=self.tol, random_state=seed, algorithm=algorithm)
            model.fit(X)
        centers = model.cluster_centers_.astype(X.dtype)
        n_distinct = len(np.unique(centers, axis=0))
        if n_distinct < self.n_clusters or any(
            "distinct clusters" in str(w.message) for w in caught
        ):
            raise ValueError(_too_few_distinct(self.n_clusters))
        self.centers_ = np.ascontiguousarray(centers)
        self.n_iter_ = int(model.n_iter_)
        self.inertia_ = float(nearest_words(X.astype(np.float64), self.centers_.astype(np.float64))[1].sum())
        self.algorithm_ = algorithm

    def _fit_faiss(self, X, seed, max_iter):
        """faiss's Lloyd iterations, ``n_init`` runs from seeds drawn from ``seed``."""
        faiss = _faiss()
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        n, dim = X32.shape
        k = int(self.n_clusters)
        best = None
        for run_seed in np.random.RandomState(seed).randint(2**31 - 1, size=self.n_init):
            clustering = faiss.Clustering(dim, k)
            clustering.niter = max_iter
            clustering.seed = int(run_seed)
            # Every descriptor: no subsampling to 256 per center, and no warning on stderr
            # below 39 per center (the sample was already bounded by max_descriptors).
            clustering.max_points_per_centroid = -(-n // k)
            clustering.min_points_per_centroid = 1
            index = faiss.IndexFlatL2(dim)
            clustering.train(X32, index)
            centers = faiss.vector_to_array(clustering.centroids).reshape(k, dim)
            labels, inertia = _assignment_inertia(X, centers.astype(X.dtype))
            if best is None or inertia < best[1]:
                best = (centers, inertia, labels, int(clustering.iteration_stats.size()))
        centers, inertia, labels, n_iter = best
        if np.count_nonzero(np.bincount(labels, minlength=k)) < k and len(np.unique(X, axis=0)) < k:
            # faiss splits empty clusters into near copies: fewer distinct descriptors
            # than words shows as words that no descriptor is nearest to.
            raise ValueError(_too_few_distinct(k))
        self.centers_ = np.ascontiguousarray(centers, dtype=X.dtype)
        self.n_iter_ = n_iter
        self.inertia_ = inertia

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

    def _extra_metadata(self):
        # Which algorithm trained the words (the "algorithm" parameter may say "auto").
        return {"algorithm": getattr(self, "algorithm_", None)}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Distances come in the input's precision, as KMeans.transform's.
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _faiss():
    """The faiss module, loaded with the OpenBLAS kernel this CPU supports."""
    load_faiss()
    import faiss

    return faiss


def _assignment_inertia(X, centers):
    """Nearest center of each row of X (products in X's dtype, near ties decided in
    float64) and the float64 inertia of that assignment.

    BLAS on one thread inside numba's tasks (each makes its block's products): the same
    words (exact in any blocking), and no BLAS pool fighting numba's on the same cores:
    measured 2.6x faster (48k RootSIFT x 16k words, 2 loaded cores), 131 s of a 599 s
    16k-word training before."""
    with single_threaded_blas():
        labels = nearest_words(X, centers, with_distances=False)[0]
    inertia = 0.0
    for start in range(0, len(X), 65536):
        rows = slice(start, start + 65536)
        residuals = X[rows].astype(np.float64) - centers[labels[rows]].astype(np.float64)
        inertia += float(np.einsum("ij,ij->", residuals, residuals))
    return labels, inertia


def _too_few_distinct(n_clusters):
    return (f"the descriptors have fewer distinct values than n_clusters={n_clusters} "
            "(e.g. all identical); use fewer clusters or more varied images")
