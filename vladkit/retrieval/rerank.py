"""Spatial re-ranking of retrieval results (Philbin et al., CVPR 2007).

Global vectors find candidates; local features decide. For each of the top R results of a
query, its local features are matched with the query's (:func:`vladkit.retrieval.spatial.match_descriptors`)
and a geometric model is fitted to the matches (:func:`vladkit.retrieval.spatial.verify`: OpenCV's
robust estimators). Verified candidates (enough inliers) move to the front, by
inlier count; the others keep their order behind them. The re-ranked list holds exactly
the ids of the original top R.

The indexed images' local features live in a :class:`FeatureStore`: two files beside the
index (``rerank.json``, the layout, and ``rerank.bin``, the arrays), memory-mapped, so a
query reads only its candidates' features. Descriptors are stored as uint8 with one float32
scale per row (``x ~ q * scale / 255``, scale = the row's largest value: an error of at
most 1/510 of it), positions as float32: 136 bytes per feature, at most
``max_features`` per image (OpenCV keeps the strongest).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._util.io import atomic_output
from .._util.threads import effective_n_jobs, limit_threads, ordered_map
from ..pipeline.budget import DEFAULT_MAX_MEMORY, iter_batches
from ..features.extractors import SIFT, LocalFeatures
from .spatial import spatial_score

__all__ = ["FeatureStore", "RerankResult", "default_rerank_extractor", "rerank", "write_feature_store"]

STORE_FORMAT = "vladkit-rerank-features"
STORE_FORMAT_VERSION = 1
STORE_JSON, STORE_BIN = "rerank.json", "rerank.bin"

#: Features kept per image: enough for a verification to find tens of inliers on an
#: attacked copy, few enough to match 100 candidates in well under a second.
MAX_FEATURES = 1000

#: SIFT's contrast threshold for re-ranking features: half OpenCV's 0.04, so that small,
#: blurred or heavily compressed copies keep enough keypoints to verify. On
#: bench_retrieval.py's 80 attacked queries against their own originals, the share with
#: at least 5 inliers went from 0.86 (0.04) to 0.94 (0.02); 0.01 added nothing (0.93).
CONTRAST_THRESHOLD = 0.02

#: Lowe's ratio for re-ranking's tentative matches: looser than his 0.8, because the
#: geometric model, not the ratio test, rejects the wrong matches. Same set, re-ranking
#: the Fisher top 100: 0.887 first with 0.8, 0.938 with 0.9.
RATIO = 0.9


def default_rerank_extractor(n_jobs=1):
    """Sparse RootSIFT (at most :data:`MAX_FEATURES` per image, contrast threshold
    :data:`CONTRAST_THRESHOLD`, images read at 1024 px): the features re-ranking stores and
    extracts from queries."""
    return SIFT(MAX_FEATURES, root=True, contrast_threshold=CONTRAST_THRESHOLD, n_jobs=n_jobs)


def write_feature_store(images, folder, extractor=None, *, max_memory=DEFAULT_MAX_MEMORY, progress=None,
                        on_unreadable=None):
    """Extract and store the local features of ``images`` (in order: row i is image i).

    Parameters
    ----------
    images : list of paths
    folder : path
        Where ``rerank.json`` and ``rerank.bin`` are written (atomically).
    extractor : SIFT or DenseSIFT, default :func:`default_rerank_extractor`
    max_memory : int
        Batch budget (:func:`vladkit.pipeline.budget.iter_batches`).
    progress : callable(n), optional
    on_unreadable : callable(index, ImageReadError), optional
        An unreadable image gets no features (it cannot be verified, and keeps its rank).

    Returns
    -------
    (json path, bin path)
    """
    from ..pipeline.recipe import describe_extractor

    extractor = default_rerank_extractor() if extractor is None else extractor
    folder = Path(folder)
    counts = np.zeros(len(images), dtype=np.int64)
    shapes = np.zeros((len(images), 2), dtype=np.int32)  # (height, width) as read: the inlier threshold's scale
    parts = {"descriptors": [], "scales": [], "positions": []}
    # Arrays are streamed to one temporary file per kind, then joined into rerank.bin.
    temporary = {name: folder / f".rerank-{name}.tmp" for name in parts}
    handles = {name: open(path, "wb") for name, path in temporary.items()}
    dim = extractor._descriptor_dim
    try:
        done = 0
        for batch in iter_batches(extractor, list(images), max_memory=max_memory, on_unreadable=on_unreadable):
            for index, pieces in batch:
                features = list(pieces)
                descriptors = np.concatenate([f.descriptors for f in features]) if features else np.zeros((0, dim))
                positions = np.concatenate([f.positions for f in features]) if features else np.zeros((0, 2))
                quantized, scales = quantize(descriptors)
                handles["descriptors"].write(quantized.tobytes())
                handles["scales"].write(scales.tobytes())
                handles["positions"].write(np.ascontiguousarray(positions, dtype=np.float32).tobytes())
                counts[index] = len(descriptors)
                if features:
                    shapes[index] = features[0].image_shape[:2]
            end = batch[-1][0] + 1
            del batch
            if progress is not None:
                progress(end - done)
            done = end
        if progress is not None and done < len(images):
            progress(len(images) - done)
    finally:
        for handle in handles.values():
            handle.close()
    try:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(offsets[-1])
        layout, position = {}, 0
        arrays = [("offsets", offsets.dtype, offsets.shape), ("shapes", shapes.dtype, shapes.shape),
                  ("descriptors", np.uint8, (total, dim)),
                  ("scales", np.float32, (total,)), ("positions", np.float32, (total, 2))]
        for name, dtype, shape in arrays:
            layout[name] = {"offset": position, "dtype": np.dtype(dtype).str, "shape": list(shape)}
            position += int(np.prod(shape)) * np.dtype(dtype).itemsize
        with atomic_output(folder / STORE_BIN) as out:
            out.write(offsets.tobytes())
            out.write(shapes.tobytes())
            for name in ("descriptors", "scales", "positions"):
                with open(temporary[name], "rb") as part:
                    while block := part.read(1 << 22):
                        out.write(block)
        header = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
                  "extractor": describe_extractor(extractor), "n_images": len(images), "n_features": total,
                  "layout": layout}
        with atomic_output(folder / STORE_JSON, "w") as out:
            json.dump(header, out, indent=1, sort_keys=True)
    finally:
        for path in temporary.values():
            if path.exists():
                path.unlink()
    return folder / STORE_JSON, folder / STORE_BIN


def quantize(descriptors):
    """(uint8 rows, float32 scales): q = round(255 x / max(x)), per row (descriptors >= 0)."""
    descriptors = np.asarray(descriptors, dtype=np.float32)
    scales = descriptors.max(axis=1) if len(descriptors) else np.zeros(0, np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    quantized = np.rint(np.clip(descriptors, 0, None) / safe * 255).astype(np.uint8)
    return quantized, scales.astype(np.float32)


class FeatureStore:
    """The stored local features of an index's images, read on demand (memory-mapped).

    Parameters
    ----------
    folder : path
        Holding ``rerank.json`` and ``rerank.bin`` (an index folder built with re-ranking).

    Attributes
    ----------
    extractor : SIFT or DenseSIFT
        The extractor that made them: queries must be extracted the same way.
    """

    def __init__(self, folder):
        from ..pipeline.recipe import EXTRACTORS, parse_extractor

        folder = Path(folder)
        try:
            header = json.loads((folder / STORE_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{os.fspath(folder)!r} holds no re-ranking features ({STORE_JSON}): "
                                    "build the index with re-ranking features (vladkit index build "
                                    "--rerank-features)") from exc
        if header.get("format") != STORE_FORMAT or header.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(f"{os.fspath(folder / STORE_JSON)!r} is not a vladkit re-ranking store this "
                             "version reads")
        kind, params = parse_extractor(header["extractor"])
        self.extractor = EXTRACTORS[kind](**params)
        self.n_images = int(header["n_images"])
        self._arrays = {}
        for name, spec in header["layout"].items():
            shape = tuple(spec["shape"])
            self._arrays[name] = (np.memmap(folder / STORE_BIN, dtype=np.dtype(spec["dtype"]), mode="r",
                                            offset=spec["offset"], shape=shape)
                                  if np.prod(shape) else np.zeros(shape, np.dtype(spec["dtype"])))
        self._offsets = np.asarray(self._arrays["offsets"])
        self._shapes = np.asarray(self._arrays["shapes"])

    def __len__(self):
        return self.n_images

    def __getitem__(self, row):
        """Image ``row``'s features (descriptors dequantized to float32)."""
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        quantized = np.asarray(self._arrays["descriptors"][start:end], dtype=np.float32)
        descriptors = quantized * (np.asarray(self._arrays["scales"][start:end])[:, None] / 255)
        positions = np.array(self._arrays["positions"][start:end])
        return LocalFeatures(descriptors.astype(np.float32), positions, np.ones(end - start, np.float32),
                             tuple(int(v) for v in self._shapes[row]))


@dataclass
class RerankResult:
    """One query's re-ranked top R: ``order`` (positions into the original top R, best
    first) and ``inliers`` (per original position)."""

    order: np.ndarray
    inliers: np.ndarray


def rerank(query_features, candidate_rows, store, *, min_inliers=None, model="similarity", ratio=RATIO,
           n_jobs=None, **verify_options):
    """Re-rank candidates by spatial verification against the query.

    Parameters
    ----------
    query_features : LocalFeatures
        Extracted with ``store.extractor``.
    candidate_rows : sequence of int
        The candidates' rows in ``store`` (index insertion order), in their global rank.
    store : FeatureStore
    min_inliers : int or None, default=None
        A candidate counts as verified with at least this many inliers. None: whatever
        :func:`vladkit.retrieval.spatial.verify` accepts (5 for a similarity, 6 for an affine map:
        with ratio 0.8 unrelated photos gave at most 4 and 5 chance inliers; with the
        default ratio 0.9, 1 of 4,000 unrelated pairs of bench_retrieval.py reached 5).
        On bench_retrieval.py (Fisher K=64 exact, R=100, the default features and ratio)
        a floor of 5 put 0.938 of the copies first, 6 gave 0.912, 8 gave 0.850.
    model : {"similarity", "affine"}
        Passed to :func:`vladkit.retrieval.spatial.spatial_score`, with ``ratio`` and ``verify_options``.
    ratio : float, default :data:`RATIO` (0.9)
        Lowe's ratio for the tentative matches (:func:`vladkit.retrieval.spatial.match_descriptors`).
    n_jobs : int or None
        Candidates verified at once, one thread each (matching's BLAS product and OpenCV's
        estimator release the GIL); None or -1: every core.

    Returns
    -------
    RerankResult
        Verified candidates first, by decreasing inliers (ties: global rank), then the
        others in their global order. Always a permutation of the candidates.
    """
    inliers = np.zeros(len(candidate_rows), dtype=np.int64)
    if len(query_features.descriptors):
        def score(row):
            candidate = store[int(row)]
            if not len(candidate.descriptors):
                return 0
            return spatial_score(query_features, candidate, model=model, ratio=ratio,
                                 **verify_options).n_inliers

        # One BLAS thread per verification: the candidates are the parallel work.
        with limit_threads(1):
            inliers[:] = list(ordered_map(score, candidate_rows, effective_n_jobs(-1 if n_jobs is None else n_jobs)))
    verified = inliers >= min_inliers if min_inliers is not None else inliers > 0
    ranks = np.arange(len(candidate_rows))
    order = np.lexsort((ranks, -np.where(verified, inliers, 0), ~verified))
    return RerankResult(order, inliers)
