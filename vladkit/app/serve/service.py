"""The search service of ``vladkit serve``: an index folder loaded once (:class:`SearchService`,
the synchronous half of :func:`vladkit.app.serve.web.create_app`), and the worker threads
that run its requests, each within its deadline.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.to_thread
import cv2
import numpy as np

from ...pipeline.budget import DEFAULT_MAX_MEMORY, iter_batches
from ...pipeline.recipe import describe_extractor
from ...pipeline.word_sets import QueryEncoding
from ...features.extractors import LocalFeatures
from ...pipeline.image_encoder import encode_batches
from ...features.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_size
from ...retrieval.asmk_index import ASMKIndex
from ...retrieval.index_files import IndexFileError
from ...retrieval.rerank import STORE_JSON, FeatureStore, rerank
from ...retrieval.search_folder import VOCABULARY_FILE, load_search_index

__all__ = ["SearchService", "ServiceError"]

logger = logging.getLogger("vladkit.app.serve.web")

#: Default deadline of a request, in seconds (re-ranking 500 candidates takes a few).
DEFAULT_TIMEOUT = 30.0
#: Long side of the thumbnails, in pixels, and the size of their cache.
THUMBNAIL_SIDE, THUMBNAIL_CACHE_BYTES = 256, 32 * 2**20
#: An indexed file larger than this is not read (for a thumbnail or a query by id).
MAX_FILE_BYTES = 256 * 2**20

_ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF, PNM/PAM, Sun raster, Radiance HDR or JPEG 2000"


class ServiceError(Exception):
    """A request the service refuses: an HTTP status and a message for the client."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _Expired(Exception):
    """The request's deadline passed (or its client was answered 503 already)."""


class _Deadline:
    """When a request's work must stop. Worker threads cannot be interrupted, so the work
    checks it between stages: abandoned work stops at the next one."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds
        self.abandoned = False

    def remaining(self):
        return max(0.0, self.end - time.monotonic())

    def check(self):
        if self.abandoned or time.monotonic() >= self.end:
            raise _Expired


class _ThumbnailCache:
    """A least-recently-used map bounded by the bytes of its values, safe across threads."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value):
        if len(value) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(value) - (len(old) if old is not None else 0)
            self._items[key] = value
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


def _joined(pieces):
    """One LocalFeatures from an image's pieces (sparse SIFT gives a single piece)."""
    pieces = list(pieces)
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return None
    return LocalFeatures(np.concatenate([p.descriptors for p in pieces]),
                         np.concatenate([p.positions for p in pieces]),
                         np.concatenate([p.scales for p in pieces]), pieces[0].image_shape)


class SearchService:
    """An index folder loaded for searching: the synchronous half of :func:`create_app`.

    Parameters
    ----------
    index_folder : path
        A folder written by ``vladkit index build`` (it holds the recipe and the
        vocabulary; re-ranking is available if it was built with ``--rerank-features``).
    max_pixels : int, default :data:`vladkit.features.images.DEFAULT_MAX_PIXELS`
        Images (uploads and indexed files) with more pixels than this, read from their
        header, are refused before decoding.
    n_jobs : int, default=1
        Threads for one request's extraction and re-ranking. The service's parallelism is
        across requests (``max_concurrency`` of :func:`create_app`), so 1 keeps each
        request on one core.
    max_memory : int, default 1 GB
        Working-memory budget of one request's extraction (as ``vladkit search
        --max-memory``): an image too large for it is extracted in pieces.
    thumbnail_side : int, default=256
    thumbnail_cache_bytes : int, default 32 MB
    image_root : path or None, default=None
        The folder that relative ids are relative to: the one ``vladkit encode`` ran in
        (the index does not record it). None: the current folder.

    Raises
    ------
    IndexFileError
        Besides an unreadable index: its ids are relative paths and none of them is a file
        under ``image_root`` (the service would answer 404 for every thumbnail).

    Notes
    -----
    Ids are the indexed paths, as ``vladkit encode`` listed them; relative ones are
    resolved against ``image_root`` once, when the service is created. The methods are
    safe to call from several threads at once.
    """

    def __init__(self, index_folder, *, max_pixels=DEFAULT_MAX_PIXELS, n_jobs=1, max_memory=DEFAULT_MAX_MEMORY,
                 thumbnail_side=THUMBNAIL_SIDE, thumbnail_cache_bytes=THUMBNAIL_CACHE_BYTES, image_root=None):
        for name, value in (("max_pixels", max_pixels), ("thumbnail_side", thumbnail_side),
                            ("max_memory", max_memory)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        folder = Path(index_folder)
        # The command line's loader: the same checks and messages as `vladkit search`.
        self.index, self.recipe = load_search_index(os.fspath(folder))
        self.extractor, self.encoder = self.recipe.build(vocabulary=str(folder / VOCABULARY_FILE), n_jobs=n_jobs)
        if isinstance(self.index, ASMKIndex):  # queries' word sets: query_assignment words a descriptor
            self.encoder = QueryEncoding(self.encoder)
        self.extractor.set_params(max_pixels=int(max_pixels))
        self.store = None
        if (folder / STORE_JSON).is_file():
            self.store = FeatureStore(folder)
            if len(self.store) != len(self.index):
                raise IndexFileError(f"{os.fspath(folder)!r}: its re-ranking features describe {len(self.store)} "
                                     f"images, the index holds {len(self.index)}: rebuild it")
            self.store.extractor.set_params(n_jobs=n_jobs, max_pixels=int(max_pixels))
        self.max_pixels = int(max_pixels)
        self.n_jobs = n_jobs
        self.max_memory = int(max_memory)
        self.thumbnail_side = int(thumbnail_side)
        self.folder = folder
        self.ids = self.index.ids
        self._rows = {image_id: row for row, image_id in enumerate(self.ids)}
        # Each indexed file's real path now: it is what the service will ever open for
        # that id (see _indexed_stat).
        self.image_root = os.path.abspath(os.getcwd() if image_root is None else os.fspath(image_root))
        self._real = [self._real_path(image_id) for image_id in self.ids]
        self._check_files()
        self._thumbnails = _ThumbnailCache(thumbnail_cache_bytes)
        self._warm_up()

    # -- loading ---------------------------------------------------------------------------

    def _real_path(self, image_id):
        real = os.path.realpath(os.path.join(self.image_root, image_id))
        return real if os.path.isfile(real) else None

    def _check_files(self):
        """Refuse an index whose relative ids lead nowhere from ``image_root`` (served from
        another folder than the one it was encoded in, every thumbnail would be a 404);
        log how many indexed files are missing otherwise."""
        missing = [image_id for image_id, real in zip(self.ids, self._real) if real is None]
        if not missing:
            return
        relative = [image_id for image_id in self.ids if not os.path.isabs(image_id)]
        if relative and all(self._real[self._rows[image_id]] is None for image_id in relative):
            raise IndexFileError(
                f"{os.fspath(self.folder)!r}: its image ids are paths relative to the folder 'vladkit encode' ran "
                f"in (e.g. {relative[0]!r}), and none of its {len(relative):,} relative ids is a file under "
                f"{self.image_root!r}: serve it from that folder, or name it (vladkit serve --image-root FOLDER, "
                "create_app(image_root=FOLDER))")
        logger.warning("%s of the %s indexed files are not found (e.g. %r under %r): their thumbnails and "
                       "searches by id answer 404", f"{len(missing):,}", f"{len(self.ids):,}", missing[0],
                       self.image_root)

    def _warm_up(self):
        """Run every stage once on a small generated image, so that the first query does
        not pay numba's loading and OpenCV's first-call costs."""
        rng = np.random.default_rng(0)
        image = cv2.GaussianBlur(rng.integers(0, 256, (96, 96), dtype=np.uint8), (0, 0), 2)
        ok, encoded = cv2.imencode(".png", image)
        if ok:
            self._search_bytes(encoded.tobytes(), 1, 1 if self.store is not None else 0, lambda: None)

    # -- the public operations ---------------------------------------------------------------

    def info(self):
        """What the index holds and how queries are encoded (a JSON-ready dict)."""
        recipe = self.recipe.to_json()
        inner = getattr(self.encoder, "encoder_", self.encoder)
        vocabulary = getattr(inner, "vocabulary_", None)
        if isinstance(self.index, ASMKIndex):  # an inverted file of word signatures: no vectors
            shape = {"dim": None, "index_dim": None, "kind": "asmk*" if self.index.binary else "asmk", "pq": None,
                     "whitening": None, "bytes_per_image": round(self.index.bytes_per_image)}
        else:
            shape = {"dim": self.index.dim, "index_dim": self.index.index_dim, "kind": self.index.kind,
                     "pq": None if self.index.kind == "flat" else self.index.pq,
                     "whitening": None if self.index.whitening is None else int(self.index.whitening.n_components_),
                     "bytes_per_image": self.index.bytes_per_vector}
        return {
            "index": self.folder.name,
            "images": len(self.index),
            **shape,
            "encoder": recipe["encoder"]["kind"],
            "encoder_params": recipe["encoder"]["params"],
            "words": None if vocabulary is None else int(vocabulary.n_words_),
            "pyramid": recipe["pyramid"],
            "extractor": describe_extractor(self.extractor),
            # By content: the server's own paths are not the client's business.
            "vocabulary_sha256": recipe["vocabulary"]["sha256"],
            "rerank": self.store is not None,
            "rerank_extractor": None if self.store is None else describe_extractor(self.store.extractor),
        }

    def row(self, image_id):
        """The index row of an indexed id; 404 for any other string. Ids are looked up,
        never turned into paths."""
        row = self._rows.get(image_id)
        if row is None:
            raise ServiceError(404, "no indexed image has this id")
        return row

    def search_image(self, data, top=10, rerank_depth=0, check=None):
        """Search with an encoded image (bytes): ``{"results": [...], "query": {...}}``."""
        self._check_search(top, rerank_depth)
        return self._search_bytes(data, top, rerank_depth, check or (lambda: None))

    def search_id(self, image_id, top=10, rerank_depth=0, check=None):
        """Search with the indexed image ``image_id``, extracted again from its file (the
        index keeps no usable copy of its vector: it is whitened, maybe quantized)."""
        self._check_search(top, rerank_depth)
        check = check or (lambda: None)
        data, _ = self._read_indexed(self.row(image_id))
        check()
        answer = self._search_bytes(data, top, rerank_depth, check)
        answer["query"] = {"id": image_id, **answer["query"]}
        return answer

    def thumbnail(self, image_id, check=None):
        """A JPEG of the indexed image ``image_id``, its long side at most
        ``thumbnail_side``; cached (least recently used, bounded in bytes) by file
        identity, so a changed file gets a new thumbnail."""
        row = self.row(image_id)
        _, info = self._indexed_stat(row)
        key = (row, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        cached = self._thumbnails.get(key)
        if cached is not None:
            return cached
        data, _ = self._read_indexed(row)
        (check or (lambda: None))()
        try:
            image = read_image(data, mode="rgb", max_pixels=self.max_pixels, max_side=self.thumbnail_side)
        except ImageReadError as error:
            raise ServiceError(_read_error_status(error), f"the indexed image cannot be read: {error.reason}") from None
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode the thumbnail of row {row}")
        jpeg = encoded.tobytes()
        self._thumbnails.put(key, jpeg)
        return jpeg

    # -- the work ----------------------------------------------------------------------------

    def _check_search(self, top, rerank_depth):
        if rerank_depth and self.store is None:
            raise ServiceError(400, "this index has no re-ranking features: search with rerank=0, or build the "
                                    "index with 'vladkit index build --rerank-features'")

    def check_header(self, data):
        """Refuse, before decoding, an empty upload, one whose header gives no size (the
        pixel limit could not be checked), and one over ``max_pixels``. Returns (h, w)."""
        if not data:
            raise ServiceError(400, "the upload is empty: send an image file")
        size = read_size(data)
        if size is None:
            raise ServiceError(400, f"not an image this server reads ({_ACCEPTED}): its header gives no size")
        height, width, _ = size
        if height * width > self.max_pixels:
            raise ServiceError(413, f"the image is {width} x {height} = {width * height:,} pixels, over this "
                                    f"server's limit of {self.max_pixels:,} (a guard against decompression bombs)")
        return height, width

    def _features(self, extractor, data, encoder=None):
        """Batches of one image under the memory budget (pieces for a huge one), as the
        command line reads its queries; ImageReadError becomes a 400/413 for the client."""
        try:
            yield from iter_batches(extractor, [data], max_memory=self.max_memory, encoder=encoder)
        except ImageReadError as error:
            raise ServiceError(_read_error_status(error), f"the image cannot be read: {error.reason}") from None

    def _search_bytes(self, data, top, rerank_depth, check):
        started = time.perf_counter()
        height, width = self.check_header(data)
        check()
        vector = None
        for _, vectors in encode_batches(self.encoder, self._features(self.extractor, data, self.encoder)):
            vector = vectors
        if vector is None:  # not reachable: an unreadable image raised above
            raise ServiceError(400, "the image cannot be read")
        check()
        depth = max(top, rerank_depth)
        scores, ids = self.index.search(vector, k=depth)
        scores, ids = [float(s) for s in scores[0]], list(ids[0])
        inliers = None
        if rerank_depth:
            check()
            features = None
            for batch in self._features(self.store.extractor, data):
                features = _joined(batch[0][1])
            head = ids[:rerank_depth]
            check()
            if features is not None:
                result = rerank(features, [self._rows[i] for i in head], self.store, n_jobs=self.n_jobs)
                score_of = dict(zip(ids, scores))
                ids[:len(head)] = [head[j] for j in result.order]
                scores = [score_of[i] for i in ids]
                inliers = {head[j]: int(n) for j, n in enumerate(result.inliers)}
            else:
                inliers = {}
        results = []
        for rank, (image_id, score) in enumerate(zip(ids[:top], scores[:top]), 1):
            item = {"rank": rank, "id": image_id, "score": round(score, 6)}
            if inliers is not None:
                item["inliers"] = inliers.get(image_id, 0)
            item["thumbnail"] = "/api/thumbnail?id=" + _quote(image_id)
            item["search"] = "/api/search?id=" + _quote(image_id)
            results.append(item)
        return {"query": {"width": width, "height": height, "bytes": len(data)}, "results": results,
                "ms": round(1000 * (time.perf_counter() - started), 1)}

    # -- indexed files -----------------------------------------------------------------------

    def _indexed_stat(self, row):
        """(real path, lstat) of an indexed file, refused unless its id resolves to the
        real path recorded at startup and it is a regular file there."""
        recorded = self._real[row]
        if recorded is None:
            raise ServiceError(404, "the indexed image's file was missing when the server started")
        # Any symbolic link on the way that changed since startup (the file replaced by a
        # link, a folder swapped for a link elsewhere) changes where the id resolves.
        if os.path.realpath(os.path.join(self.image_root, self.ids[row])) != recorded:
            raise ServiceError(403, "the indexed image's path no longer leads to the file that was indexed "
                                    "(a symbolic link changed since the server started): refused")
        try:
            info = os.lstat(recorded)
        except FileNotFoundError:
            raise ServiceError(404, "the indexed image's file is no longer there") from None
        if not stat.S_ISREG(info.st_mode):
            raise ServiceError(403, "the indexed image's path is no longer a regular file: refused")
        return recorded, info

    def _read_indexed(self, row):
        """The bytes of an indexed file (see :meth:`_indexed_stat`), opened without
        following a final symbolic link (one planted between the check and the opening)
        and without blocking on a FIFO planted there."""
        recorded, _ = self._indexed_stat(row)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            descriptor = os.open(recorded, flags)
        except FileNotFoundError:
            raise ServiceError(404, "the indexed image's file is no longer there") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ServiceError(403, "the indexed image's path is now a symbolic link: refused") from None
            raise ServiceError(404, f"the indexed image's file cannot be opened ({error.strerror})") from None
        with open(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ServiceError(403, "the indexed image's path is no longer a regular file: refused")
            if info.st_size > MAX_FILE_BYTES:
                raise ServiceError(413, f"the indexed image's file is over {MAX_FILE_BYTES:,} bytes")
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ServiceError(413, f"the indexed image's file is over {MAX_FILE_BYTES:,} bytes")
        return data, info


def _read_error_status(error):
    """413 for an image over the pixel limit, 400 for any other unreadable image."""
    return 413 if "exceeds the limit" in error.reason else 400


def _quote(image_id):
    # surrogateescape: a file name whose bytes are not UTF-8 travels as those bytes
    # (%XX) and comes back to the same id (see _query).
    return quote(image_id, safe="", errors="surrogateescape")


class _Runner:
    """Worker threads for CPU work: at most ``max_concurrency`` computing at once, at most
    ``max_concurrency + max_queue`` requests admitted, each within its deadline."""

    def __init__(self, max_concurrency, max_queue):
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue
        self.admitted = 0  # only touched from the event loop: no lock
        # Held by the worker thread itself: work abandoned by a timed-out request keeps
        # its slot until it stops, so abandoned work cannot exceed max_concurrency.
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._limiter = None

    @contextmanager
    def admit(self):
        if self.admitted >= self.capacity:
            raise ServiceError(503, f"the server is busy ({self.admitted} requests in progress): try again shortly",
                               {"Retry-After": "1"})
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, deadline, function, *args):
        """``function(*args, check)`` in a worker thread, ``check`` raising when the
        deadline has passed; :class:`_Expired` when it does."""
        if self._limiter is None:  # created in the serving event loop
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)

        def job():
            if not self._slots.acquire(timeout=deadline.remaining()):
                raise _Expired
            try:
                deadline.check()
                return function(*args, deadline.check)
            finally:
                self._slots.release()

        try:
            with anyio.fail_after(deadline.remaining()):
                return await anyio.to_thread.run_sync(job, abandon_on_cancel=True, limiter=self._limiter)
        except TimeoutError:
            deadline.abandoned = True
            raise _Expired from None
