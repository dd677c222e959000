"""NetVLAD (Arandjelovic et al., CVPR 2016) without torch: a scikit-learn encoder computing
the forward pass (its parameters, their initialisation and files: ``netvlad_params``).

The forward pass, for a set of N descriptors x_i in R^D (every epsilon as MATLAB's
``vlad_preL2_intra``, the same in the torch layer ``vladkit.netvlad.NetVLAD``):

1. ``normalize_input`` ("preL2"): x <- x / sqrt(sum(x^2) + 1e-12)
2. a_ik = softmax_k(w_k . x_i + b_k)     (b = 0 without a bias: the "v1" layer)
3. V_k = sum_i a_ik x_i - (sum_i a_ik) c_k   (A^T X - (A^T 1) c; no (N, K, D) tensor)
4. ``intra_norm``: V_k <- V_k / sqrt(sum(V_k^2) + 1e-12)
5. flatten by ``layout``: "KxD" (each word's D values together, as VLADEncoder) or "DxK"
   (MATLAB's: K varies fastest, V.T.ravel())
6. ``l2``: V <- V / (sqrt(sum(V^2)) + 1e-12)

An empty set gives the zero vector. This module never imports torch.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ..kernels.products import matmul
from ..kernels.accumulate import normalize_rows, task_products
from ..kernels.soft import softmax_rows
from ._base import Accumulation, BaseEncoder, add_tasks, descriptor_sets, encode_whole, split_tasks, work_dtype
from .netvlad_params import INPUT_EPS, INTRA_EPS, L2_EPS, NetVLADParams, load_netvlad
# The parameters, their initialisation and files were in this module until vladkit 0.1:
# importable from here too.
from .netvlad_params import (LAYOUTS, NetVLADFileError, init_netvlad, input_normalize, is_netvlad_file,
                             netvlad_alpha, sample_descriptors, save_netvlad)

__all__ = ["LAYOUTS", "NetVLADEncoder", "NetVLADFileError", "NetVLADParams", "init_netvlad", "input_normalize",
           "is_netvlad_file", "load_netvlad", "netvlad_alpha", "sample_descriptors", "save_netvlad"]


class NetVLADEncoder(BaseEncoder):
    """NetVLAD vectors computed without torch, from trained (or initialised) parameters.

    The forward pass of the module docstring, image by image: an image's descriptors are
    a set (LocalFeatures or an (n, D) array), and its statistics A^T X and A^T 1 are sums,
    so an image given whole, in pieces (:class:`~vladkit.ImageEncoder` under a memory
    budget) or cut into cells (:class:`~vladkit.SpatialPyramid`) gives the same vector.
    The scores X W^T + b are one BLAS product per chunk of rows and the softmax a numba
    pass, both in the descriptors' precision (float32, or float64 for float64 input);
    A^T X and A^T 1 are summed in float64, per image, by BLAS; normalisation is in float64
    and the output float32. Nothing is learnt: ``fit`` loads and checks the parameters.

    Parameters
    ----------
    params : str, path or NetVLADParams
        A file written by :func:`save_netvlad` (``vladkit netvlad train``) or parameters,
        e.g. from :func:`init_netvlad` or ``vladkit.netvlad.NetVLAD.to_params()``.
    n_jobs : int or None
        Threads for BLAS and the softmax (None: all cores).

    Attributes
    ----------
    params_ : NetVLADParams
        A checked copy of the parameters (or those loaded from the file).
    n_features_out_ : int
        K * D.
    """

    _prefix = "netvlad"

    def __init__(self, params=None, *, n_jobs=None):
        self.params = params
        self.n_jobs = n_jobs

    # -- fit -------------------------------------------------------------------------

    def _resolve_params(self):
        params = self.params
        if isinstance(params, (str, os.PathLike)):
            return load_netvlad(params)
        if isinstance(params, NetVLADParams):
            # Checked again (its arrays may have been modified since) and copied: the
            # fitted encoder does not follow later changes of the caller's object.
            return NetVLADParams(params.weight, params.bias, params.centers, metadata=params.metadata,
                                 **params.options)
        raise TypeError("params must be a NetVLAD parameters file (from save_netvlad or 'vladkit netvlad "
                        f"train') or NetVLADParams, got {type(params).__name__}")

    def fit(self, X, y=None):
        """Load and check the parameters; X's descriptors must have their dimension D.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays (nothing is learnt from them)
        y : ignored

        Returns
        -------
        self
        """
        params = self._resolve_params()
        sets = descriptor_sets(X)
        if not sets:
            raise ValueError("X holds no images")
        dims = sorted({s.shape[1] for s in sets if len(s)})
        if dims and dims != [params.dim]:
            raise ValueError(f"descriptors have dimension {dims}, the NetVLAD parameters expect {params.dim}")
        self.params_ = params
        self.n_features_out_ = params.n_features_out
        return self

    def set_params(self, **params):
        """Set the parameters of this encoder (``params``, ``n_jobs``)."""
        return super(BaseEncoder, self).set_params(**params)

    @property
    def _float32_limit(self):
        # Without input normalisation, scores x . w of descriptors beyond ~1e15 could
        # overflow float32 (then float64 throughout, see work_dtype); with it, the norms
        # are computed in float64 and every row has norm <= 1.
        params = getattr(self, "params_", None)
        return None if params is None or params.normalize_input else 1e15

    # -- transform -------------------------------------------------------------------

    def transform(self, X):
        """NetVLAD vector of each image's descriptors.

        Parameters
        ----------
        X : list of LocalFeatures or of (n_i, D) arrays
            An image with no descriptors gives a vector of zeros.

        Returns
        -------
        ndarray (n_images, K * D), float32
        """
        check_is_fitted(self, "params_")
        sets = descriptor_sets(X)
        return encode_whole(self, sets, work_dtype(sets, self._float32_limit))

    def _accumulate(self, n_images, dtype=np.float32):
        """A :class:`NetVLADAccumulation` of ``n_images`` images (given whole or in pieces)."""
        return NetVLADAccumulation(self, n_images, dtype)

    def _input_dim(self):
        return self.params_.dim

    def _project(self, chunk):
        return chunk  # no PCA: NetVLAD's input normalisation happens in _add

    def _start(self, n_images, dtype):
        params = self.params_
        return {
            "weight": params.weight.astype(dtype),
            "bias": None if params.bias is None else params.bias.astype(dtype),
            # A^T X and A^T 1 of every image, summed in float64 whatever the input (so an
            # image in pieces or in another batch gives the same vector).
            "first": np.zeros((n_images, params.n_clusters, params.dim), dtype=np.float64),
            "mass": np.zeros((n_images, params.n_clusters), dtype=np.float64),
        }

    def _add(self, X, segments, acc):
        """Add a chunk X (rows of consecutive images, ``segments``: (image, start, end))."""
        if self.params_.normalize_input:
            X = X.copy()  # (a chunk of one image may be the caller's own array: see _pack)
            normalize_rows(X, INPUT_EPS)
        scores = matmul(X, acc["weight"].T)
        # In place: scores + b, then softmax over each row, every weight kept (threshold 0).
        softmax_rows(scores, acc["bias"])
        first, mass = acc["first"], acc["mass"]
        tasks = split_tasks(segments)
        a = scores.astype(np.float64, copy=False)
        task_first = np.zeros((len(tasks),) + first.shape[1:])
        task_products(a, X.astype(np.float64, copy=False), tasks, task_first)
        add_tasks(first, tasks, task_first)
        for image, start, end in segments.tolist():
            mass[image] += a[start:end].sum(axis=0)

    def _finish(self, acc, counts):
        params = self.params_
        first, mass = acc["first"], acc["mass"]
        n, n_clusters, dim = first.shape
        centers = params.centers.astype(np.float64)
        out = np.empty((n, n_clusters * dim), dtype=np.float32)
        # Blocks of images: the float64 temporaries stay small whatever n.
        step = max(1, (1 << 22) // max(n_clusters * dim, 1))
        for begin in range(0, n, step):
            block = slice(begin, min(begin + step, n))
            V = first[block]
            V -= mass[block, :, None] * centers  # V_k = sum_i a_ik x_i - (sum_i a_ik) c_k
            if params.intra_norm:
                V /= np.sqrt(np.einsum("nkd,nkd->nk", V, V) + INTRA_EPS)[:, :, None]
            if params.layout == "DxK":
                V = V.transpose(0, 2, 1)
            V = V.reshape(len(V), -1)
            if params.l2:
                V = V / (np.sqrt(np.einsum("nj,nj->n", V, V)) + L2_EPS)[:, None]
            out[block] = V
        return out

    # -- names -----------------------------------------------------------------------

    def _feature_names(self):
        params = self.params_
        K, D = params.n_clusters, params.dim
        if params.layout == "DxK":
            return [f"netvlad_w{k}_d{d}" for d in range(D) for k in range(K)]
        return [f"netvlad_w{k}_d{d}" for k in range(K) for d in range(D)]

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns in the output order: ``netvlad_w3_d7`` is word 3,
        dimension 7 (K x D layout: word by word; D x K: dimension by dimension)."""
        check_is_fitted(self, "params_")
        return np.asarray(self._feature_names(), dtype=object)


class NetVLADAccumulation(Accumulation):
    """:class:`~vladkit.encoders._base.Accumulation` for a NetVLADEncoder, which has
    parameters instead of a vocabulary (and no PCA: see its ``_input_dim`` and
    ``_project``); only the messages about bad rows differ."""

    def add(self, image, descriptors):
        """Add (n, D) descriptors (or LocalFeatures) of image number ``image``."""
        descriptors = np.asarray(getattr(descriptors, "descriptors", descriptors))
        if descriptors.ndim != 2 and len(descriptors):
            raise ValueError(f"image {image}: descriptors must be a 2-D (n, D) array, got shape "
                             f"{descriptors.shape}")
        if len(descriptors) and descriptors.shape[1] != self._dim:
            raise ValueError(f"image {image}: descriptors have dimension {descriptors.shape[1]}, the "
                             f"NetVLAD parameters expect {self._dim}")
        super().add(image, descriptors)
