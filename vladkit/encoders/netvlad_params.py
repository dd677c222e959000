"""NetVLAD's parameters without torch: :class:`NetVLADParams`, their initialisation from
k-means words (``init_netvlad``: the sample of MATLAB's ``getClusters.m`` and the
sharpness alpha) and their files (``save_netvlad``, ``load_netvlad``). The forward pass
they parametrise is described in, and computed by, :mod:`vladkit.encoders.netvlad`. This
module never imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .._version import __version__
from .._util.io import write_npz_atomically
from ..kernels.products import squared_norms
from ..kernels.nearest import two_nearest_squared_distances

__all__ = [
    "LAYOUTS",
    "NetVLADFileError",
    "NetVLADParams",
    "DEFAULT_INIT",
    "init_netvlad",
    "input_normalize",
    "is_netvlad_file",
    "load_netvlad",
    "netvlad_alpha",
    "sample_descriptors",
    "save_netvlad",
]

FILE_FORMAT = "vladkit-netvlad"
FILE_FORMAT_VERSION = 1
LAYOUTS = ("KxD", "DxK")
INIT_VERSIONS = ("v1", "v2")
#: The initialisation used when none is given (``init_netvlad``, ``NetVLAD.from_vocabulary``,
#: ``train_netvlad``, ``vladkit netvlad train --init``): "v2", the paper's formulation
#: (Eq. 3: w_k = 2 alpha c_k, b_k = -alpha ||c_k||^2, the assignment of soft VLAD
#: softmax_k(-alpha ||x - c_k||^2)). It has a bias, as ``NetVLAD(K, D)`` built with the
#: constructor's defaults, so the state_dict of any default layer loads into any other.
#: MATLAB's "v1" has none; in this project's benchmarks neither trained better.
DEFAULT_INIT = "v2"
#: The epsilons of MATLAB's vlad_preL2_intra: inside the square root for the input and
#: intra norms, added to the norm for the final L2.
INPUT_EPS = 1e-12
INTRA_EPS = 1e-12
L2_EPS = 1e-12
#: NetVLAD's initialisation: the nearest word weighs on average 100 times the second.
_RATIO = 100.0


class NetVLADFileError(ValueError):
    """A NetVLAD parameters file vladkit cannot load (the message says why)."""


# ---------------------------------------------------------------------------- params


def _flag(name, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(eq=False)
class NetVLADParams:
    """The parameters of a NetVLAD layer: what the torch layer trains and
    :class:`NetVLADEncoder` runs.

    Attributes
    ----------
    weight : (K, D) float32
        Assignment weights w_k.
    bias : (K,) float32 or None
        Assignment biases b_k; None: no bias (MATLAB's default "v1" layer).
    centers : (K, D) float32
        Residual centers c_k (MATLAB stores -c).
    normalize_input, intra_norm, l2 : bool, default True
    layout : {"KxD", "DxK"}, default "KxD"
    metadata : dict
        JSON-able: ``descriptor_type`` (the extractor description, as vocabularies record
        it), ``init`` ("v1"/"v2"), ``alpha``, a training summary...

    The arrays are copied into new float32 C-contiguous arrays (a torch tensor's numpy view
    is not shared) and checked: shapes, finite values, options.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    centers: np.ndarray
    normalize_input: bool = True
    intra_norm: bool = True
    l2: bool = True
    layout: str = "KxD"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weight = _float32_array("weight", self.weight, 2)
        self.centers = _float32_array("centers", self.centers, 2)
        if self.weight.shape[0] < 1 or self.weight.shape[1] < 1:
            raise ValueError(f"weight must have shape (K, D) with K, D >= 1, got {self.weight.shape}")
        if self.centers.shape != self.weight.shape:
            raise ValueError(f"centers have shape {self.centers.shape}, expected the weight's (K, D) = "
                             f"{self.weight.shape}")
        if self.bias is not None:
            self.bias = _float32_array("bias", self.bias, 1)
            if self.bias.shape != (self.weight.shape[0],):
                raise ValueError(f"bias has shape {self.bias.shape}, expected (K,) = ({self.weight.shape[0]},) "
                                 "or None")
        self.normalize_input = _flag("normalize_input", self.normalize_input)
        self.intra_norm = _flag("intra_norm", self.intra_norm)
        self.l2 = _flag("l2", self.l2)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.metadata is None:
            self.metadata = {}
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        self.metadata = dict(self.metadata)

    @property
    def n_clusters(self):
        """K, the number of clusters."""
        return self.weight.shape[0]

    @property
    def dim(self):
        """D, the descriptor dimension."""
        return self.weight.shape[1]

    @property
    def n_features_out(self):
        """K * D, the length of a NetVLAD vector."""
        return self.weight.shape[0] * self.weight.shape[1]

    @property
    def options(self):
        """The forward-pass options as a dict (as the file stores them)."""
        return {"normalize_input": self.normalize_input, "intra_norm": self.intra_norm,
                "l2": self.l2, "layout": self.layout}

    def __eq__(self, other):
        if not isinstance(other, NetVLADParams):
            return NotImplemented
        return (np.array_equal(self.weight, other.weight) and np.array_equal(self.centers, other.centers)
                and (self.bias is None) == (other.bias is None)
                and (self.bias is None or np.array_equal(self.bias, other.bias))
                and self.options == other.options and self.metadata == other.metadata)

    __hash__ = None

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"NetVLADParams(n_clusters={self.n_clusters}, dim={self.dim}, "
                f"bias={self.bias is not None}, {options})")


def _float32_array(name, value, ndim):
    try:
        array = np.array(value, dtype=np.float32, copy=True, order="C")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf (or values beyond float32's range)")
    return array


# ---------------------------------------------------------------------- initialisation


def _centers_of(centers):
    """(centers float64 (K, D), descriptor_type or None) from an array or a fitted
    KMeansVocabulary (without PCA: NetVLAD works on the descriptors themselves)."""
    from ..vocabulary.gmm import GMMVocabulary
    from ..vocabulary.kmeans import KMeansVocabulary

    if isinstance(centers, GMMVocabulary):
        raise TypeError("NetVLAD is initialised from k-means words: got a GMMVocabulary, give a "
                        "KMeansVocabulary or a (K, D) array of centers")
    if isinstance(centers, KMeansVocabulary):
        check_is_fitted(centers, "descriptor_dim_")
        if centers.pca_components_ is not None:
            raise ValueError("the vocabulary was trained after a PCA; NetVLAD's centers live in the "
                             "descriptor space (PCA is not part of NetVLAD): train a KMeansVocabulary "
                             "with pca=None")
        return np.asarray(centers.centers_, dtype=np.float64), centers.descriptor_type
    array = np.asarray(centers, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"centers must be a (K, D) array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("centers contain NaN or inf")
    return array, None


def _sample_of(descriptors, dim):
    X = np.asarray(getattr(descriptors, "descriptors", descriptors))
    if X.ndim != 2:
        raise ValueError(f"descriptors must be a 2-D (n, D) array, got shape {X.shape}")
    if X.dtype.kind not in "fiu":
        raise TypeError(f"descriptors must be numeric, got dtype {X.dtype}")
    if X.shape[1] != dim:
        raise ValueError(f"descriptors have dimension {X.shape[1]}, the centers {dim}")
    if len(X) == 0:
        raise ValueError("no descriptors to estimate alpha from")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise ValueError("descriptors contain NaN or inf")
    return X


def input_normalize(X):
    """x / sqrt(sum(x^2) + 1e-12) per row (MATLAB's preL2), a new array of X's dtype."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64) + INPUT_EPS)
    return X / norms.astype(X.dtype)[:, None]


def netvlad_alpha(centers, descriptors, version=DEFAULT_INIT):
    """The sharpness alpha of NetVLAD's initialisation, computed in float64.

    - "v1" (MATLAB's default): c_hat = c / ||c||; per descriptor the dot products
      c_hat . x sorted descending; alpha = -log(0.01) / mean(top1 - top2).
    - "v2": d1^2, d2^2 the squared distances to the two nearest centers;
      alpha = -log(0.01) / mean(d2^2 - d1^2).

    Parameters
    ----------
    centers : (K, D) array or fitted KMeansVocabulary (no PCA), K >= 2
    descriptors : (n, D) array
        Used as given: already input-normalised if the layer normalises its input.
    version : {"v1", "v2"}

    Returns
    -------
    float > 0

    Raises
    ------
    ValueError
        Fewer than 2 centers, or no gap at all between the two best centers over the sample.
    """
    if version not in INIT_VERSIONS:
        raise ValueError(f"version must be one of {INIT_VERSIONS}, got {version!r}")
    c, _ = _centers_of(centers)
    if len(c) < 2:
        raise ValueError(f"alpha needs at least 2 centers (the two best ones), got {len(c)}")
    X = _sample_of(descriptors, c.shape[1])
    if version == "v1":
        # A zero center has no direction: its c_hat is 0 (norm floored at 1e-12).
        c_hat = c / np.maximum(np.sqrt(squared_norms(c)), 1e-12)[:, None]
    else:
        c_sqnorm = squared_norms(c)
    gap = 0.0
    for start in range(0, len(X), 4096):
        block = X[start:start + 4096]
        if version == "v1":
            top = np.partition(block @ c_hat.T, len(c) - 2, axis=1)[:, -2:]
            gap += float(np.sum(np.abs(top[:, 1] - top[:, 0])))
        else:
            distances = two_nearest_squared_distances(block, c, c_sqnorm)
            gap += float(np.sum(distances[:, 1] - distances[:, 0]))
    if not gap > 0:
        raise ValueError(f"no descriptor of the sample separates its two best centers ({version} "
                         "gap 0): alpha is undefined; use more varied descriptors or other centers")
    return math.log(_RATIO) * len(X) / gap


def init_netvlad(centers, descriptors, version=DEFAULT_INIT, *, normalize_input=True, intra_norm=True,
                 l2=True, layout="KxD", metadata=None):
    """NetVLAD parameters initialised from k-means centers (Arandjelovic et al. 2016).

    - "v1" (MATLAB's default layer, no bias): weight = alpha * c / ||c||, bias None;
    - "v2": weight = 2 alpha c, bias = -alpha ||c||^2, so softmax_k(w_k . x + b_k) =
      softmax_k(-alpha ||x - c_k||^2), i.e. ``VLADEncoder(assignment="soft", alpha=alpha)``;

    centers = c in both, alpha from :func:`netvlad_alpha`. With ``normalize_input`` the
    sample is input-normalised here first (a no-op within 1e-12 for rows that already
    are), as the layer sees its input.

    Parameters
    ----------
    centers : (K, D) array or fitted KMeansVocabulary (no PCA), K >= 2
        A vocabulary's ``descriptor_type`` goes into the metadata unless given there.
    descriptors : (n, D) array, the sample (MATLAB: 50,000 descriptors, 100 per image;
        see :func:`sample_descriptors`)
    version : {"v1", "v2"}
    normalize_input, intra_norm, l2, layout : the layer's options
    metadata : dict or None, JSON-able; ``init`` and ``alpha`` are added

    Returns
    -------
    NetVLADParams
    """
    if version not in INIT_VERSIONS:
        raise ValueError(f"version must be one of {INIT_VERSIONS}, got {version!r}")
    c, descriptor_type = _centers_of(centers)
    X = _sample_of(descriptors, c.shape[1])
    if _flag("normalize_input", normalize_input):
        X = input_normalize(X)
    alpha = netvlad_alpha(c, X, version)
    if version == "v1":
        weight = alpha * c / np.maximum(np.sqrt(squared_norms(c)), 1e-12)[:, None]
        bias = None
    else:
        weight = 2.0 * alpha * c
        bias = -alpha * squared_norms(c)
    meta = dict(metadata or {})
    if descriptor_type is not None:
        meta.setdefault("descriptor_type", descriptor_type)
    meta.update({"init": version, "alpha": alpha, "n_init_descriptors": int(len(X))})
    return NetVLADParams(weight, bias, c, normalize_input=normalize_input, intra_norm=intra_norm,
                         l2=l2, layout=layout, metadata=meta)


def sample_descriptors(sets, n_descriptors=50_000, per_image=100, random_state=None):
    """A sample for :func:`init_netvlad` as MATLAB's ``getClusters.m`` draws it:
    ``per_image`` random descriptors from each of ceil(n_descriptors / per_image) random
    images (all images if fewer; fewer rows from an image that has fewer).

    Parameters
    ----------
    sets : list of (n_i, D) arrays or LocalFeatures
    n_descriptors, per_image : int
    random_state : None, int or RandomState (None: a fixed sample)

    Returns
    -------
    (m, D) array, m <= n_descriptors, rows in image order
    """
    arrays = [np.asarray(getattr(s, "descriptors", s)) for s in sets]
    if not any(len(a) for a in arrays):
        raise ValueError("no descriptors to sample")
    seed = 0 if random_state is None else int(check_random_state(random_state).randint(2**31 - 1))
    rng = np.random.default_rng([seed, 5])
    n_images = min(len(arrays), -(-int(n_descriptors) // int(per_image)))
    chosen = np.sort(rng.choice(len(arrays), n_images, replace=False))
    parts = []
    for image in chosen.tolist():
        rows = arrays[image]
        if len(rows) > per_image:
            rows = rows[np.sort(np.random.default_rng([seed, 6, image]).choice(len(rows), per_image, replace=False))]
        parts.append(rows)
    return np.concatenate(parts)[:n_descriptors]


# ------------------------------------------------------------------------------ files


def save_netvlad(params, path):
    """Write NetVLAD parameters to ``path`` (.npz), atomically and reproducibly.

    Arrays ``weight``, ``centers`` and ``bias`` (when there is one), float32, and a JSON
    ``metadata`` entry: ``format: "vladkit-netvlad"``, ``format_version: 1``,
    ``n_clusters``, ``dim``, ``bias`` (bool), ``options`` (normalize_input, intra_norm, l2,
    layout), ``metadata`` (the params' own) and ``vladkit_version``. Equal parameters give
    byte-identical files.
    """
    if not isinstance(params, NetVLADParams):
        raise TypeError(f"params must be NetVLADParams, got {type(params).__name__}")
    try:
        user = json.loads(json.dumps(params.metadata, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params.metadata must be JSON-able: {exc}") from exc
    metadata = {
        "format": FILE_FORMAT,
        "format_version": FILE_FORMAT_VERSION,
        "n_clusters": int(params.n_clusters),
        "dim": int(params.dim),
        "bias": params.bias is not None,
        "dtype": "float32",
        "options": params.options,
        "metadata": user,
        "vladkit_version": __version__,
    }
    arrays = {"weight": params.weight, "centers": params.centers,
              "metadata": np.array(json.dumps(metadata, sort_keys=True))}
    if params.bias is not None:
        arrays["bias"] = params.bias
    write_npz_atomically(path, arrays)


def _read_npz(name):
    """The arrays and the parsed metadata of a vladkit .npz, or NetVLADFileError."""
    try:
        archive = np.load(name, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise NetVLADFileError(f"{name!r} is not a NetVLAD parameters file (not a readable .npz archive: "
                               f"{exc})") from exc
    if not hasattr(archive, "files"):
        raise NetVLADFileError(f"{name!r} is not a NetVLAD parameters file (a single .npy array, not an "
                               ".npz archive)")
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise NetVLADFileError(
                        f"{name!r} contains pickled Python objects (entry {key!r}); NetVLAD parameters "
                        "files hold plain arrays only, so it refuses to load it (unpickling could run "
                        "arbitrary code)") from exc
                raise NetVLADFileError(f"{name!r}: entry {key!r} cannot be read: {exc}") from exc
    if "metadata" not in arrays:
        raise NetVLADFileError(f"{name!r} is not a NetVLAD parameters file (no metadata entry; expected "
                               f"format {FILE_FORMAT!r})")
    try:
        metadata = json.loads(str(arrays.pop("metadata")))
    except ValueError as exc:
        raise NetVLADFileError(f"{name!r}: the metadata entry is not valid JSON") from exc
    if not isinstance(metadata, dict):
        raise NetVLADFileError(f"{name!r}: bad metadata (not a JSON object)")
    return arrays, metadata


_OTHER_FORMATS = {
    "vladkit-vocabulary": "a vladkit vocabulary (from 'vladkit vocab build')",
    "vladkit-encodings": "a vladkit encodings file (from 'vladkit encode')",
}


def load_netvlad(path):
    """Load NetVLAD parameters written by :func:`save_netvlad`.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    NetVLADParams

    Raises
    ------
    NetVLADFileError
        Not an .npz archive, pickled objects inside, not a NetVLAD file (a vocabulary or
        encodings file included), another format version, options, shapes or dtypes other
        than expected, NaN or inf.
    FileNotFoundError
    """
    name = os.fspath(path)
    arrays, metadata = _read_npz(name)
    kind = metadata.get("format")
    if kind != FILE_FORMAT:
        what = _OTHER_FORMATS.get(kind, f"format {kind!r}")
        raise NetVLADFileError(f"{name!r} is {what}, not a NetVLAD parameters file (format "
                               f"{FILE_FORMAT!r})")
    version = metadata.get("format_version")
    if version != FILE_FORMAT_VERSION:
        raise NetVLADFileError(
            f"{name!r} has NetVLAD format version {version!r}; this vladkit ({__version__}) reads "
            f"version {FILE_FORMAT_VERSION} (re-create the file, or use the vladkit version that wrote it)")
    n_clusters, dim, has_bias = metadata.get("n_clusters"), metadata.get("dim"), metadata.get("bias")
    if not (isinstance(n_clusters, int) and isinstance(dim, int) and n_clusters >= 1 and dim >= 1
            and isinstance(has_bias, bool)):
        raise NetVLADFileError(f"{name!r}: metadata must give n_clusters and dim (positive integers) and "
                               f"bias (true/false), got {n_clusters!r}, {dim!r}, {has_bias!r}")
    expected = {"weight": (n_clusters, dim), "centers": (n_clusters, dim)}
    if has_bias:
        expected["bias"] = (n_clusters,)
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise NetVLADFileError(f"{name!r}: missing arrays {missing}")
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise NetVLADFileError(f"{name!r}: unexpected arrays {extra} (expected {sorted(expected)})")
    for key, shape in expected.items():
        array = arrays[key]
        if array.shape != shape or array.dtype != np.float32:
            raise NetVLADFileError(f"{name!r}: {key} has shape {array.shape} and dtype {array.dtype}, "
                                   f"expected {shape} float32 (K = {n_clusters}, D = {dim})")
        if not np.all(np.isfinite(array)):
            raise NetVLADFileError(f"{name!r}: {key} contains NaN or inf")
    options = metadata.get("options")
    if not isinstance(options, dict) or set(options) != {"normalize_input", "intra_norm", "l2", "layout"}:
        raise NetVLADFileError(f"{name!r}: options must give normalize_input, intra_norm, l2 and layout, "
                               f"got {options!r}")
    user = metadata.get("metadata", {})
    try:
        return NetVLADParams(arrays["weight"], arrays.get("bias"), arrays["centers"], metadata=user,
                             **options)
    except (TypeError, ValueError) as exc:
        raise NetVLADFileError(f"{name!r}: {exc}") from None


def is_netvlad_file(path):
    """Whether ``path`` is a vladkit NetVLAD parameters file, judged from its metadata
    format (cheap: reads only the metadata member). Never raises for unreadable files."""
    import zipfile

    try:
        with zipfile.ZipFile(os.fspath(path)) as archive, archive.open("metadata.npy") as member:
            text = np.lib.format.read_array(member, allow_pickle=False)
        return json.loads(str(text)).get("format") == FILE_FORMAT
    except Exception:
        return False
