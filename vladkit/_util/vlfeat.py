"""ctypes bindings to VLFeat's C library, the reference vladkit is checked against.

Used by the tests and the benchmarks, not by vladkit itself. VLFeat comes from the
system (Debian/Ubuntu: ``apt-get install libvlfeat-dev``); :func:`load` returns None where
it is absent, and callers skip. Arrays are passed row-major (N, D), which is the memory
layout of VLFeat's column-major D x N.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

VL_TYPE_FLOAT, VL_TYPE_DOUBLE = 1, 2
VL_DISTANCE_L2 = 1
VLAD_NORMALIZE_COMPONENTS, VLAD_SQUARE_ROOT, VLAD_UNNORMALIZED, VLAD_NORMALIZE_MASS = 1, 2, 4, 8
FISHER_SQUARE_ROOT, FISHER_NORMALIZED, FISHER_IMPROVED, FISHER_FAST = 1, 2, 3, 4

_library = None
_CANDIDATES = ("libvl.so", "libvl.so.1", "libvl.so.0.9.21")


def load():
    """The loaded ``libvl``, or None if VLFeat is not installed."""
    global _library
    if _library is not None:
        return _library
    names = [ctypes.util.find_library("vl"), *_CANDIDATES]
    for name in filter(None, names):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        _declare(library)
        _library = library
        return library
    return None


def _declare(lib):
    p, size = ctypes.c_void_p, ctypes.c_size_t
    lib.vl_vlad_encode.argtypes = [p, ctypes.c_int, p, size, size, p, size, p, ctypes.c_int]
    lib.vl_vlad_encode.restype = None
    lib.vl_fisher_encode.argtypes = [p, ctypes.c_int, p, size, size, p, p, p, size, ctypes.c_int]
    lib.vl_fisher_encode.restype = size
    lib.vl_kmeans_new.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.vl_kmeans_new.restype = p
    lib.vl_kmeans_delete.argtypes = [p]
    lib.vl_kmeans_set_centers.argtypes = [p, p, size, size]
    lib.vl_kmeans_quantize.argtypes = [p, p, p, p, size]
    lib.vl_set_num_threads.argtypes = [size]
    lib.vl_get_max_threads.restype = size


def _ptr(array):
    return array.ctypes.data_as(ctypes.c_void_p)


def _type_of(dtype):
    return VL_TYPE_FLOAT if dtype == np.float32 else VL_TYPE_DOUBLE


def set_num_threads(n):
    load().vl_set_num_threads(n)


def vlad_encode(data, means, assignments, flags):
    """``vl_vlad_encode``: data (N, D), means (K, D), assignments (N, K) -> (K*D,)."""
    dtype = data.dtype
    data, means = np.ascontiguousarray(data), np.ascontiguousarray(means, dtype=dtype)
    assignments = np.ascontiguousarray(assignments, dtype=dtype)
    n_words, dim = means.shape
    out = np.zeros(n_words * dim, dtype=dtype)
    load().vl_vlad_encode(_ptr(out), _type_of(dtype), _ptr(means), dim, n_words,
                          _ptr(data), len(data), _ptr(assignments), flags)
    return out


def fisher_encode(data, means, variances, priors, flags):
    """``vl_fisher_encode``: data (N, D), means/variances (K, D), priors (K,) -> (2*K*D,)."""
    dtype = data.dtype
    data = np.ascontiguousarray(data)
    means, variances, priors = (np.ascontiguousarray(a, dtype=dtype) for a in (means, variances, priors))
    n_words, dim = means.shape
    out = np.zeros(2 * n_words * dim, dtype=dtype)
    load().vl_fisher_encode(_ptr(out), _type_of(dtype), _ptr(means), dim, n_words, _ptr(variances),
                            _ptr(priors), _ptr(data), len(data), flags)
    return out


class KMeansQuantizer:
    """``vl_kmeans_quantize`` with fixed centers: exact nearest-center assignment."""

    def __init__(self, centers):
        self.centers = np.ascontiguousarray(centers)
        lib = load()
        self._handle = lib.vl_kmeans_new(_type_of(self.centers.dtype), VL_DISTANCE_L2)
        lib.vl_kmeans_set_centers(self._handle, _ptr(self.centers), self.centers.shape[1], self.centers.shape[0])

    def __call__(self, data):
        data = np.ascontiguousarray(data, dtype=self.centers.dtype)
        labels = np.zeros(len(data), dtype=np.uint32)
        distances = np.zeros(len(data), dtype=self.centers.dtype)
        load().vl_kmeans_quantize(self._handle, _ptr(labels), _ptr(distances), _ptr(data), len(data))
        return labels, distances

    def __del__(self):
        if getattr(self, "_handle", None) and _library is not None:
            _library.vl_kmeans_delete(self._handle)
            self._handle = None


# ------------------------------------------------------------------------ dense SIFT


class _DsiftKeypoint(ctypes.Structure):
    _fields_ = [("x", ctypes.c_double), ("y", ctypes.c_double), ("s", ctypes.c_double),
                ("norm", ctypes.c_double)]


class _DsiftGeometry(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("numBinT", "numBinX", "numBinY", "binSizeX", "binSizeY")]


class _DsiftFilter(ctypes.Structure):
    """VlDsiftFilter (vl/dsift.h, 0.9.21): its setters are inline, so fields are set here."""
    _fields_ = [
        *[(name, ctypes.c_int) for name in ("imWidth", "imHeight", "stepX", "stepY", "boundMinX",
                                              "boundMinY", "boundMaxX", "boundMaxY")],
        ("geom", _DsiftGeometry),
        ("useFlatWindow", ctypes.c_int),
        ("windowSize", ctypes.c_double),
        ("numFrames", ctypes.c_int),
        ("descrSize", ctypes.c_int),
        ("frames", ctypes.POINTER(_DsiftKeypoint)),
        ("descrs", ctypes.POINTER(ctypes.c_float)),
        ("numBinAlloc", ctypes.c_int),
        ("numFrameAlloc", ctypes.c_int),
        ("numGradAlloc", ctypes.c_int),
        ("grads", ctypes.c_void_p),
        ("convTmp1", ctypes.c_void_p),
        ("convTmp2", ctypes.c_void_p),
    ]


def _declare_dsift(lib):
    lib.vl_dsift_new_basic.argtypes = [ctypes.c_int] * 4
    lib.vl_dsift_new_basic.restype = ctypes.POINTER(_DsiftFilter)
    lib.vl_dsift_delete.argtypes = [ctypes.POINTER(_DsiftFilter)]
    lib.vl_dsift_process.argtypes = [ctypes.POINTER(_DsiftFilter), ctypes.c_void_p]
    lib._vl_dsift_update_buffers.argtypes = [ctypes.POINTER(_DsiftFilter)]
    size = ctypes.c_size_t
    lib.vl_imsmooth_f.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size,
                                  ctypes.c_double, ctypes.c_double]


def phow_dsift(image, step=4, sizes=(4, 6, 8, 10), magnif=6.0, window_size=1.5):
    """VLFeat's PHOW dense SIFT (``vl_phow``'s grey path, float descriptors), in C.

    For each size: ``vl_imsmooth_f`` with sigma = sqrt((size / magnif)^2 - 0.25), then
    ``vl_dsift`` with a flat window of ``window_size``, bounds starting at
    floor(1.5 (max(sizes) - size)) so that all sizes share centres.

    Parameters
    ----------
    image : (h, w) float32 in [0, 1]

    Returns
    -------
    descriptors : (n, 128) float32, VLFeat's C layout (element (y * 4 + x) * 8 + t, t
        counter-clockwise with y *down*), unit L2 norm
    frames : (n, 4) float64, x, y, scale, norm (the norm before normalisation)
    """
    lib = load()
    if not hasattr(lib, "_dsift_declared"):
        _declare_dsift(lib)
        lib._dsift_declared = True
    image = np.ascontiguousarray(image, dtype=np.float32)
    height, width = image.shape
    all_descriptors, all_frames = [], []
    for size in sizes:
        offset = int(np.floor(1.5 * (max(sizes) - size)))
        sigma = np.sqrt(max((size / magnif) ** 2 - 0.25, 0.0))
        smoothed = np.empty_like(image)
        lib.vl_imsmooth_f(_ptr(smoothed), width, _ptr(image), width, height, width, sigma, sigma)
        handle = lib.vl_dsift_new_basic(width, height, step, size)
        try:
            dsift = handle.contents
            dsift.boundMinX, dsift.boundMinY = offset, offset
            dsift.boundMaxX, dsift.boundMaxY = width - 1, height - 1
            dsift.useFlatWindow = 1
            dsift.windowSize = window_size
            lib._vl_dsift_update_buffers(handle)
            lib.vl_dsift_process(handle, _ptr(smoothed))
            n, dim = dsift.numFrames, dsift.descrSize
            descriptors = np.ctypeslib.as_array(dsift.descrs, shape=(n * dim,)).reshape(n, dim).copy()
            frames_pointer = ctypes.cast(dsift.frames, ctypes.POINTER(ctypes.c_double))
            frames = np.ctypeslib.as_array(frames_pointer, shape=(n * 4,)).reshape(n, 4).copy()
        finally:
            lib.vl_dsift_delete(handle)
        all_descriptors.append(descriptors)
        all_frames.append(frames.reshape(-1, 4))
    return np.concatenate(all_descriptors), np.concatenate(all_frames)


def vlfeat_dsift_to_vladkit_order(descriptors):
    """VLFeat's C layout to vladkit's (OpenCV's): the same spatial order, orientation bins
    mirrored (VLFeat measures angles with y down, OpenCV with y up): o' = (8 - o) % 8."""
    d = np.asarray(descriptors).reshape(len(descriptors), 16, 8)
    return d[:, :, (-np.arange(8)) % 8].reshape(len(descriptors), 128)
