"""``vladkit serve``: a search service over an index folder, and a web page to look at results.

An ASGI application (Starlette, served by uvicorn) built by :func:`create_app`:

* ``GET /`` -- a page (``vladkit/static/index.html``: plain JavaScript, no framework, no
  CDN) to upload or drop a photo, see the nearest indexed images and search again from any
  of them;
* ``GET /api/health``, ``GET /api/info``;
* ``POST /api/search`` (an image as the body, raw or as the multipart field ``image``) and
  ``GET /api/search?id=...`` (an indexed image);
* ``GET /api/thumbnail?id=...`` (a JPEG of an indexed image, at most 256 pixels a side).

What it does, and why:

* Everything is loaded once, when the application is created: the index, its recipe and
  vocabulary, the re-ranking features if the index has them, and the real path of every
  indexed file. A request then costs one extraction, one encoding and one search (the
  command line pays the loading, ~1 s, on every query).
* CPU work (decoding, extraction, encoding, search, re-ranking, thumbnails) runs in worker
  threads, at most ``max_concurrency`` at once, never on the event loop: the server keeps
  answering (``/api/health`` above all) while queries are computed. OpenCV, faiss, BLAS and
  numba release the GIL, so the threads run in parallel.
* Each request has a deadline (``timeout``). Past it the client gets 503 at once; the
  abandoned work stops at its next stage (decode, extract, encode, search, re-rank) and
  keeps holding its CPU slot until then, so timed-out requests cannot pile up work beyond
  ``max_concurrency``. Requests beyond ``max_concurrency + max_queue`` waiting for the CPU
  are refused with 503 and ``Retry-After`` rather than queued without bound.
* Safe to expose: the body is read in chunks and refused past ``max_upload_bytes`` (413;
  a larger ``Content-Length`` is refused before reading); the image's size is read from its
  header and refused past ``max_pixels`` before any decoding (413: decompression bombs are
  never allocated), and so are images whose header gives no size; truncated and non-image
  bytes are 400; an id is looked up in the index's ids and never joined to a path (404 if
  unknown); an indexed file is opened by the real path recorded at startup, only if its id
  still resolves to it (a symbolic link planted since is refused with 403), without
  following a final link, and only if it is a regular file; every error is a JSON
  ``{"error": message}``, and an unexpected exception is logged on the server with its
  traceback and answered with a short 500. Responses carry ``nosniff``, no-referrer and a
  strict Content-Security-Policy (the page's inline script and style are allowed by hash).
* Only requests addressed to the server by an allowed name (its Host header; by default
  this machine's own: ``localhost``, ``127.0.0.1``, ``[::1]``) are answered, others get
  400: a page of another site that rebinds its domain to this address (DNS rebinding)
  cannot read the index's paths and photos.
* Connections, served by :func:`run` or :func:`serve_in_thread`: a request's headers must
  arrive within ``header_timeout`` and its body within the request's time limit, or the
  connection is closed; one client holds at most ``max_connections_per_client`` at once.
  Without that, uvicorn waits for a request forever, and 256 idle sockets (its
  ``limit_concurrency``) had every other client answered 503.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote

import anyio
import anyio.to_thread
import cv2
import h11
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .budget import DEFAULT_MAX_MEMORY, iter_batches
from .encodings import describe_extractor
from .features import LocalFeatures
from .image_encoder import encode_batches
from .images import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_size
from .index import IndexFileError
from .rerank import STORE_JSON, FeatureStore, rerank

# Starlette imports python-multipart only when it parses a form: without it, every upload
# would fail. Imported now, so that a missing one fails at startup, naming itself.
importlib.import_module("python_multipart")

__all__ = ["LOOPBACK_HOSTS", "SearchService", "ServiceError", "allowed_hosts_for", "create_app", "run",
           "serve_in_thread"]

logger = logging.getLogger("vladkit.serve")

#: Default cap on a request body: a phone photo is 2-12 MB.
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000
#: Default deadline of a request, in seconds (re-ranking 500 candidates takes a few).
DEFAULT_TIMEOUT = 30.0
#: Default bounds of the ``top`` and ``rerank`` query parameters.
MAX_TOP, MAX_RERANK = 100, 500
#: Long side of the thumbnails, in pixels, and the size of their cache.
THUMBNAIL_SIDE, THUMBNAIL_CACHE_BYTES = 256, 32 * 2**20
#: An indexed file larger than this is not read (for a thumbnail or a query by id).
MAX_FILE_BYTES = 256 * 2**20
#: The Host headers answered by default: this machine's own names. A page of another site
#: that rebinds its domain to 127.0.0.1 sends its own domain, and is refused.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Default cap on the connections one client (one address; an IPv6 /64) holds open at once:
#: a browser opens at most 6 to a server; uvicorn's limit on all of them is 256.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 16
#: Default time a connection has to send a request's complete headers, in seconds.
DEFAULT_HEADER_TIMEOUT = 10.0
#: The re-ranking depths README's "Finding near-duplicates" recommends: 100 on an exact
#: index; 200 on a quantized one (its top 200 holds more of the copies than its top 100,
#: for ~0.1-0.2 s more a query). The page starts its "re-rank the top" field there.
RECOMMENDED_RERANK = {"flat": 100, "pq": 200, "ivfpq": 200}

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
    max_pixels : int, default :data:`vladkit.images.DEFAULT_MAX_PIXELS`
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
        # The command line's loader: the same checks and messages as `vladkit search`.
        from ._commands import VOCABULARY_FILE, CommandError, _load_search_index

        for name, value in (("max_pixels", max_pixels), ("thumbnail_side", thumbnail_side),
                            ("max_memory", max_memory)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        folder = Path(index_folder)
        try:
            self.index, self.recipe = _load_search_index(os.fspath(folder))
        except CommandError as error:
            raise IndexFileError(str(error)) from None
        self.extractor, self.encoder = self.recipe.build(vocabulary=str(folder / VOCABULARY_FILE), n_jobs=n_jobs)
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
        return {
            "index": self.folder.name,
            "images": len(self.index),
            "dim": self.index.dim,
            "index_dim": self.index.index_dim,
            "kind": self.index.kind,
            "pq": None if self.index.kind == "flat" else self.index.pq,
            "whitening": None if self.index.whitening is None else int(self.index.whitening.n_components_),
            "bytes_per_image": self.index.bytes_per_vector,
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


# --------------------------------------------------------------------------- the ASGI app


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


def _json(value, status=200, headers=None):
    # ensure_ascii: ids with undecodable bytes (surrogate escapes) stay valid JSON.
    body = json.dumps(value, ensure_ascii=True, allow_nan=False).encode()
    return Response(body, status, headers={"Cache-Control": "no-store", **(headers or {})},
                    media_type="application/json")


def _error(status, message, headers=None):
    return _json({"error": message}, status, headers)


def _query(request):
    """The query parameters, each name to its list of values; percent-escapes that are
    not UTF-8 decode to surrogate escapes (the ids of such files, see _quote)."""
    text = request.scope.get("query_string", b"").decode("latin-1")
    return parse_qs(text, keep_blank_values=True, errors="surrogateescape")


def _one(params, name, default=None):
    values = params.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise ServiceError(400, f"the parameter {name!r} is given {len(values)} times: give it once")
    return values[0]


def _integer(params, name, default, low, high):
    text = _one(params, name)
    if text is None:
        return default
    if not re.fullmatch(r"\s*\d{1,9}\s*", text) or not low <= int(text) <= high:
        raise ServiceError(400, f"the parameter {name!r} must be an integer from {low} to {high}, got {text[:40]!r}")
    return int(text)


_PAGE_CSP = ("default-src 'none'; img-src 'self' blob:; connect-src 'self'; script-src {script}; "
             "style-src {style}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


def _page():
    """The page's HTML and its Content-Security-Policy, whose hashes allow exactly its
    inline script and style (and nothing injected beside them)."""
    text = resources.files("vladkit").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")

    def hashes(tag):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() + "'"
                        for block in found) or "'none'"

    return text.encode(), _PAGE_CSP.format(script=hashes("script"), style=hashes("style"))


class _SecurityHeaders:
    """Headers every response gets (pure ASGI middleware: bodies stream through)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                                    (b"x-frame-options", b"DENY"), (b"content-security-policy", _API_CSP.encode()),
                                    (b"cross-origin-resource-policy", b"same-origin")):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _check_allowed_hosts(allowed_hosts):
    """The host patterns as TrustedHostMiddleware takes them (lower case), or ValueError."""
    if isinstance(allowed_hosts, str) or not isinstance(allowed_hosts, Iterable):
        raise ValueError(f"allowed_hosts must be a list of host names, got {allowed_hosts!r}")
    hosts = []
    for host in allowed_hosts:
        # Starlette's own rules (it asserts them): '*' alone, or a leading '*.' only.
        if (not isinstance(host, str) or not host or any(c.isspace() or c in "/@" for c in host)
                or "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*."))):
            raise ValueError(f"allowed_hosts: {host!r} is not a host name, an address ('[::1]' for IPv6), "
                             "'*.domain' or '*'")
        hosts.append(host.lower())
    if not hosts:
        raise ValueError("allowed_hosts is empty: no request could be answered")
    return tuple(dict.fromkeys(hosts))


def allowed_hosts_for(bind_host, extra=()):
    """The Host headers to answer for a server listening on ``bind_host``.

    Parameters
    ----------
    bind_host : str
        The address (or name) the server listens on, as given to :func:`run`.
    extra : list of str
        More names clients will use (as ``create_app``'s ``allowed_hosts``).

    Returns
    -------
    tuple of str
        :data:`LOOPBACK_HOSTS`, ``bind_host`` itself when it is a specific address or name
        (clients can type it; a rebinding page cannot send it, an address above all), and
        ``extra``: what to give ``create_app(allowed_hosts=...)``.

    Raises
    ------
    ValueError
        ``bind_host`` listens on every interface (``0.0.0.0``, ``::``) and ``extra`` is
        empty: the names clients will use cannot be guessed. Or a pattern is malformed.
    """
    hosts = list(LOOPBACK_HOSTS)
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        address = None
    if bind_host in ("", "*") or (address is not None and address.is_unspecified):
        if not extra:
            raise ValueError(f"listening on every interface ({bind_host or 'all'}), the server cannot know the "
                             "names clients will reach it by: give them (--allowed-host NAME, repeatable, e.g. "
                             "this machine's address or name on the network; allowed_hosts=[...]), or '*' to "
                             "answer any (no protection against DNS rebinding)")
    elif address is not None and address.version == 6:
        hosts.append(f"[{address.compressed}]")
    else:
        hosts.append(bind_host)
    return _check_allowed_hosts([*hosts, *extra])


class _TrustedHosts:
    """Refuses (400) a request whose Host header is not an allowed one: the defence against
    DNS rebinding, where a page of another site renames its domain to this server's
    address and reads the answers as its own (the request then carries that domain).

    Starlette's TrustedHostMiddleware decides (its parsing of the header, ports and IPv6
    brackets included); the refusal is this service's JSON error, saying what to do.
    """

    _ACCEPTED = "vladkit.trusted_host"

    def __init__(self, app, allowed_hosts):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self._decide = TrustedHostMiddleware(self._accept, allowed_hosts=list(allowed_hosts), www_redirect=False)

    @classmethod
    async def _accept(cls, scope, receive, send):
        scope[cls._ACCEPTED] = True

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            probe = dict(scope)

            async def discard(message):  # the middleware's own refusal, replaced below
                pass

            await self._decide(probe, receive, discard)
            if not probe.get(self._ACCEPTED):
                host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
                response = _error(400, f"this server answers requests for {', '.join(self.allowed_hosts)} only, "
                                       f"not for the host {host[:100]!r}; to reach it by that name, start it "
                                       "with --allowed-host NAME (create_app(allowed_hosts=...))")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(index_folder, *, max_upload_bytes=DEFAULT_MAX_UPLOAD_BYTES, max_pixels=DEFAULT_MAX_PIXELS,
               timeout=DEFAULT_TIMEOUT, max_concurrency=None, max_queue=32, max_top=MAX_TOP, max_rerank=MAX_RERANK,
               n_jobs=1, max_memory=DEFAULT_MAX_MEMORY, thumbnail_side=THUMBNAIL_SIDE,
               thumbnail_cache_bytes=THUMBNAIL_CACHE_BYTES, allowed_hosts=LOOPBACK_HOSTS, image_root=None):
    """The search service of an index folder, as an ASGI application (Starlette).

    Everything is loaded here, once (see :class:`SearchService`); serve the result with
    uvicorn (:func:`run`, ``vladkit serve``) or any ASGI server.

    Parameters
    ----------
    index_folder : path
        Written by ``vladkit index build`` (``--rerank-features`` for ``rerank=``).
    max_upload_bytes : int, default 20,000,000
        Largest request body (the image, or the multipart form carrying it): 413 beyond.
    max_pixels : int, default 100,000,000
        Largest image, in pixels, read from its header before decoding: 413 beyond.
    timeout : float, default=30
        Seconds a request may take, waiting for a worker and upload included: 503 beyond
        (408 if the upload itself was still arriving).
    max_concurrency : int or None, default=None
        Requests computed at once, one worker thread each; None: one per core.
    max_queue : int, default=32
        Requests that may wait for a worker besides; more get 503 with ``Retry-After``.
        Memory is bounded by ``(max_concurrency + max_queue) * max_upload_bytes`` for the
        bodies, plus ``max_concurrency * max_memory`` for the extraction.
    max_top, max_rerank : int, default 100 and 500
        Bounds of the ``top`` and ``rerank`` parameters.
    n_jobs, max_memory, thumbnail_side, thumbnail_cache_bytes, image_root
        As :class:`SearchService`.
    allowed_hosts : list of str, default :data:`LOOPBACK_HOSTS`
        The names (and addresses) a request may address the server by, in its Host header,
        with or without a port: ``"localhost"``, ``"photos.example.org"``, ``"[::1]"``,
        ``"*.example.org"`` (its subdomains), ``"*"`` (any: no protection against DNS
        rebinding). Any other is refused with 400. The default answers only this machine's
        own names, right for a server bound to 127.0.0.1; add the names clients use when
        it is reachable from elsewhere.

    Returns
    -------
    starlette.applications.Starlette
        Its ``state.service`` is the :class:`SearchService`.

    Raises
    ------
    FileNotFoundError, IndexFileError, vladkit.encodings.EncodingsFileError
        The folder is missing, not an index, or lacks its recipe or vocabulary.
    ValueError
        A limit is not a positive number, or a host pattern is malformed.

    Notes
    -----
    The connections themselves (how many one client may hold open, how long a request may
    take to arrive) are the HTTP server's to bound: :func:`run` and :func:`serve_in_thread`
    do; behind another ASGI server, configure its equivalents.
    """
    if max_concurrency is None:
        max_concurrency = os.cpu_count() or 1
    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_concurrency", max_concurrency),
                        ("max_top", max_top)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("max_queue", max_queue), ("max_rerank", max_rerank)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    allowed_hosts = _check_allowed_hosts(allowed_hosts)
    service = SearchService(index_folder, max_pixels=max_pixels, n_jobs=n_jobs, max_memory=max_memory,
                            thumbnail_side=thumbnail_side, thumbnail_cache_bytes=thumbnail_cache_bytes,
                            image_root=image_root)
    runner = _Runner(int(max_concurrency), int(max_queue))
    page, page_csp = _page()
    limits = {"max_upload_bytes": int(max_upload_bytes), "max_pixels": service.max_pixels, "max_top": int(max_top),
              "max_rerank": int(max_rerank) if service.store is not None else 0, "timeout": float(timeout)}
    # Where the page's "re-rank the top" field starts (the API's own default stays 0).
    default_rerank = min(RECOMMENDED_RERANK.get(service.index.kind, 100), limits["max_rerank"])
    info = {**service.info(), "default_rerank": default_rerank, "limits": limits}

    def endpoint(handler):
        async def wrapped(request):
            try:
                return await handler(request)
            except ServiceError as error:
                return _error(error.status, error.message, error.headers)
            except HTTPException as error:  # Starlette's own (a malformed multipart body)
                return _error(error.status_code, str(error.detail))
            except ClientDisconnect:
                return Response(status_code=400)  # nobody is listening any more
            except Exception:
                # The traceback goes to the server's log, never to the client.
                logger.exception("internal error on %s %s", request.method, request.url.path)
                return _error(500, "internal server error (logged on the server)")
        return wrapped

    async def compute(deadline, function, *args):
        try:
            return await runner.run(deadline, function, *args)
        except _Expired:
            raise ServiceError(503, f"the request did not finish within the server's time limit of {timeout:g} s: "
                                    "the server is busy or the image is too large; try again",
                               {"Retry-After": "1"}) from None

    async def refuse_upload(request, deadline, message, drain):
        """413, after reading and discarding up to ``drain`` more bytes of the body: a
        client still sending (as urllib and browsers do) then reads the answer instead of
        a connection reset by the server's close."""
        drained = 0
        if drain > 0 and "100-continue" not in request.headers.get("expect", "").lower():
            with anyio.move_on_after(min(deadline.remaining(), 10.0)):
                while drained < drain:
                    message_ = await request.receive()
                    if message_["type"] != "http.request":
                        break
                    drained += len(message_.get("body", b""))
                    if not message_.get("more_body", False):
                        break
        raise ServiceError(413, message, {"Connection": "close"})

    async def read_body(request, deadline):
        """The uploaded image's bytes: the multipart field ``image``, or the whole body.
        Read in chunks and refused as soon as it exceeds ``max_upload_bytes``."""
        drain = 4 * max_upload_bytes  # at most this much is read in vain to answer 413
        length = request.headers.get("content-length")
        if length is not None:
            if not re.fullmatch(r"\d{1,20}", length.strip()):
                raise ServiceError(400, "the Content-Length header is not a number")
            if int(length) > max_upload_bytes:
                await refuse_upload(request, deadline, f"the upload is {int(length):,} bytes, over this server's "
                                    f"limit of {max_upload_bytes:,} bytes",
                                    int(length) if int(length) <= drain else 0)
        received = 0

        async def capped_receive():
            nonlocal received
            message = await request.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_upload_bytes:
                    await refuse_upload(request, deadline, f"the upload is over this server's limit of "
                                        f"{max_upload_bytes:,} bytes",
                                        drain - received if message.get("more_body", False) else 0)
            return message

        capped = Request(request.scope, capped_receive)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            with anyio.fail_after(deadline.remaining()):
                if content_type == "multipart/form-data":
                    async with capped.form(max_files=1, max_fields=8) as form:
                        image = form.get("image")
                        if image is None or isinstance(image, str):
                            raise ServiceError(400, "the multipart upload has no file field named 'image'")
                        return await image.read()
                # Anything else is the image itself (image/jpeg, application/octet-stream,
                # and curl --data-binary's default, application/x-www-form-urlencoded).
                chunks = []
                async for chunk in capped.stream():
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError:
            raise ServiceError(408, f"the upload did not arrive within the server's time limit of {timeout:g} s") \
                from None

    def search_params(params):
        top = _integer(params, "top", 10, 1, max_top)
        depth = _integer(params, "rerank", 0, 0, max_rerank)
        service._check_search(top, depth)  # 400 for rerank= on an index without features
        return top, depth

    async def homepage(request):
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": page_csp, "Cache-Control": "no-cache"})

    async def health(request):
        return _json({"status": "ok"})

    async def favicon(request):
        # Browsers ask for it with every page: "no icon", rather than a 404 in their log.
        return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})

    async def get_info(request):
        return _json(info)

    async def search_post(request):
        params = _query(request)
        if "id" in params:
            raise ServiceError(400, "POST searches with the uploaded image; to search by an indexed image, "
                                    "GET /api/search?id=...")
        top, depth = search_params(params)
        deadline = _Deadline(timeout)
        with runner.admit():
            data = await read_body(request, deadline)
            return _json(await compute(deadline, service.search_image, data, top, depth))

    async def search_get(request):
        params = _query(request)
        image_id = _one(params, "id")
        if image_id is None:
            raise ServiceError(400, "give the id of an indexed image (GET /api/search?id=...), or POST an image")
        top, depth = search_params(params)
        service.row(image_id)  # 404 before queueing
        deadline = _Deadline(timeout)
        with runner.admit():
            return _json(await compute(deadline, service.search_id, image_id, top, depth))

    async def search(request):
        # One route for both methods, so that a 405 (OPTIONS, PUT...) lists both in Allow.
        return await (search_post if request.method == "POST" else search_get)(request)

    async def thumbnail(request):
        image_id = _one(_query(request), "id")
        if image_id is None:
            raise ServiceError(400, "give the id of an indexed image: /api/thumbnail?id=...")
        service.row(image_id)
        deadline = _Deadline(timeout)
        with runner.admit():
            jpeg = await compute(deadline, service.thumbnail, image_id)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    async def http_error(request, error):
        # Starlette's routing errors (404 unknown path, 405 wrong method) as JSON.
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    async def server_error(request, error):
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return _error(500, "internal server error (logged on the server)")

    routes = [
        Route("/", endpoint(homepage), methods=["GET"]),
        Route("/favicon.ico", endpoint(favicon), methods=["GET"]),
        Route("/api/health", endpoint(health), methods=["GET"]),
        Route("/api/info", endpoint(get_info), methods=["GET"]),
        Route("/api/search", endpoint(search), methods=["GET", "POST"]),
        Route("/api/thumbnail", endpoint(thumbnail), methods=["GET"]),
    ]
    app = Starlette(routes=routes,
                    # The host check inside: its refusals get the security headers too.
                    middleware=[Middleware(_SecurityHeaders), Middleware(_TrustedHosts, allowed_hosts=allowed_hosts)],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    app.state.limits = limits
    app.state.allowed_hosts = allowed_hosts
    return app


# ----------------------------------------------------------------------------- serving

#: Seconds an application still answering gets, once a request body is overdue, to send
#: its own answer (this service's reads the body within the same limit, and answers 408).
_BODY_GRACE = 1.0


def _client_key(address):
    """Whom a connection counts against: its IPv4 address, or the /64 network of an IPv6
    one (one subscriber's usual allocation: counted per address, a single client would
    get a cap per address it can pick)."""
    if ":" not in address:  # IPv4, already in its one written form: the usual case, kept cheap
        return address
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # a scope ("fe80::1%eth0") is not a client
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _raw_error(status, reason, message, headers=()):
    """A complete HTTP/1.1 answer carrying this service's JSON error, for a connection the
    protocol refuses before (or without) a request that an application could answer."""
    body = json.dumps({"error": message}, ensure_ascii=True).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", "cache-control: no-store", "x-content-type-options: nosniff", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, guarded against clients that hold connections open.

    uvicorn waits for a request without a time limit, and answers 503 to everyone once
    ``limit_concurrency`` connections are open: 256 sockets that send nothing lock a
    server out. So:

    * at most ``max_per_client`` connections are open at once from one client (an
      address; an IPv6 client: its /64); one more is answered 503 and closed at once;
    * a request's headers must be complete within ``header_timeout`` seconds of the
      connection's opening (or, on a kept-alive connection, of the request's first byte),
      its body within ``body_timeout`` seconds of the headers; past that the connection
      is closed (with a 408 if part of the request came). An application still answering
      when the body is overdue gets ``_BODY_GRACE`` seconds to send its own answer first.

    Between requests, uvicorn's keep-alive timeout applies as before. The limits, and the
    count of open connections per client shared by a server's connections, are class
    attributes of the subclass :func:`_guarded_protocol` makes for each server; they are
    only touched from the server's event loop, so they need no lock.
    """

    max_per_client = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    header_timeout = DEFAULT_HEADER_TIMEOUT
    body_timeout = DEFAULT_TIMEOUT
    open_per_client = None  # {client: open connections}, one dict per server
    refusal = b""  # the answer to a connection over the cap, made once per server

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._counted_as = None  # the client this connection counts against, once counted
        self._timer = None
        self._phase = None  # what the timer waits for: "headers" or "body"
        self._grace = False

    # -- the cap -------------------------------------------------------------------------

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.max_per_client and self.client:
            client = _client_key(self.client[0])
            if self.open_per_client.get(client, 0) >= self.max_per_client:
                # Out of uvicorn's count at once, not when the close completes: a burst of
                # refused connections must not push the others past limit_concurrency.
                self.connections.discard(self)
                transport.write(self.refusal)
                transport.close()
                return
            self.open_per_client[client] = self.open_per_client.get(client, 0) + 1
            self._counted_as = client
        self._arm(self.header_timeout, "headers")

    def connection_lost(self, exc):
        self._disarm()
        if self._counted_as is not None:
            left = self.open_per_client[self._counted_as] - 1
            if left:
                self.open_per_client[self._counted_as] = left
            else:
                del self.open_per_client[self._counted_as]
            self._counted_as = None
        super().connection_lost(exc)

    # -- the timeouts --------------------------------------------------------------------

    def data_received(self, data):
        if self._timer is None and self.conn.their_state is h11.IDLE:
            # The first bytes of the next request on a kept-alive connection.
            self._arm(self.header_timeout, "headers")
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self):
        super().on_response_complete()
        # A pipelined request may have started with the next cycle.
        self._follow_request()

    def _follow_request(self):
        """Move the timer with the request: the body's deadline once the headers are in,
        none once the request is complete (or the connection is ending)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm(self.body_timeout, "body")
        elif state is h11.IDLE:
            if self._timer is None and self.conn.trailing_data[0]:
                self._arm(self.header_timeout, "headers")
        else:
            self._disarm()

    def _arm(self, seconds, phase):
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)
        self._phase, self._grace = phase, False

    def _disarm(self):
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self):
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.cycle is not None and not self.cycle.response_complete \
                and not self._grace:
            self._grace = True
            self._timer = self.loop.call_later(_BODY_GRACE, self._expired)
            return
        if self._phase == "headers" and self.conn.trailing_data[0]:
            # Part of a request came: say why it is dropped (a silent close is for idle ones).
            self.transport.write(_raw_error(408, "Request Timeout", "the request's headers did not arrive within "
                                            f"this server's limit of {self.header_timeout:g} s"))
        self.transport.close()


def _guarded_protocol(max_per_client, header_timeout, body_timeout):
    """A :class:`_GuardedH11Protocol` subclass for one server, with its limits and its own
    count of connections per client."""
    if not isinstance(max_per_client, (int, np.integer)) or isinstance(max_per_client, bool) or max_per_client < 0:
        raise ValueError(f"max_connections_per_client must be a non-negative integer (0: no cap), "
                         f"got {max_per_client!r}")
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    # Made once: a client over its cap may open connections by the thousand.
    refusal = _raw_error(503, "Service Unavailable", f"too many connections from your address ({max_per_client} "
                         "are open): close some, or retry in a moment", ("retry-after: 1",))
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {
        "max_per_client": int(max_per_client), "header_timeout": float(header_timeout),
        "body_timeout": float(body_timeout), "open_per_client": {}, "refusal": refusal})


def _uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client, header_timeout,
                    body_timeout, **options):
    if body_timeout is None:
        # The app's own limit on a request (create_app's timeout), which its body reads obey.
        body_timeout = getattr(getattr(app, "state", None), "limits", {}).get("timeout", DEFAULT_TIMEOUT)
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet,
        lifespan="off", server_header=False,
        # h11, pinned (not "auto", which would take httptools where installed): the
        # guards against idle and slow connections are built on it.
        http=_guarded_protocol(max_connections_per_client, header_timeout, body_timeout),
        # No WebSocket routes: an upgrade request is plain HTTP (a protocol switched away
        # from would take its connection out of the guards' count).
        ws="none",
        # Open connections beyond this get 503 from uvicorn itself: with max_queue, a
        # bound on the memory that slow or many clients can hold.
        limit_concurrency=limit_concurrency, timeout_keep_alive=5, **options)


def _raise_open_files_limit(wanted=65536):
    """Raise this process's soft limit on open files towards its hard limit.

    asyncio accepts the waiting connections in batches, before their protocols run: a
    burst of them (a client's connections over its cap included, refused an instant
    later) holds one file each for that instant. At the usual soft limit, 1,024, such a
    burst runs it out, and asyncio then stops accepting anyone for a second.
    """
    try:
        import resource
    except ImportError:  # not on Windows, which has no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # refused (macOS caps it below its hard limit): serve anyway
            pass


def run(app, *, host="127.0.0.1", port=8000, quiet=False, limit_concurrency=256,
        max_connections_per_client=DEFAULT_MAX_CONNECTIONS_PER_CLIENT, header_timeout=DEFAULT_HEADER_TIMEOUT,
        body_timeout=None):
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C or SIGTERM).

    Parameters
    ----------
    app : ASGI application (from :func:`create_app`)
    host : str, default "127.0.0.1"
        This machine only; "0.0.0.0" listens on every interface (give ``create_app`` the
        ``allowed_hosts`` clients will use then).
    port : int, default=8000
    quiet : bool
        No access log, only warnings and errors.
    limit_concurrency : int, default=256
        Connections at once; uvicorn answers 503 beyond.
    max_connections_per_client : int, default=16
        Connections one client (an address; an IPv6 client: its /64) may hold open at once;
        one more is answered 503 and closed at once. 0: no cap (behind a reverse proxy,
        every client has the proxy's address: let the proxy cap them).
    header_timeout : float, default=10
        Seconds a connection has to send a request's complete headers, from its opening
        (or, between kept-alive requests, from the request's first byte); past it the
        connection is closed.
    body_timeout : float or None, default=None
        Seconds a request's body has to arrive once the headers are in; past it the
        connection is closed. None: the app's own time limit (``create_app``'s
        ``timeout``, 30 s by default), within which it answers 408 itself.

    Raises
    ------
    ValueError
        A limit is not a positive number (``max_connections_per_client``: not a
        non-negative integer).

    Notes
    -----
    Serving is the process's job then: its soft limit on open files is raised towards the
    hard limit (at most 65,536), so that a burst of connections cannot run it out.
    """
    config = _uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client, header_timeout,
                             body_timeout)
    _raise_open_files_limit()
    uvicorn.Server(config).run()


@contextmanager
def serve_in_thread(app, *, host="127.0.0.1", port=0, quiet=True, limit_concurrency=256,
                    max_connections_per_client=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                    header_timeout=DEFAULT_HEADER_TIMEOUT, body_timeout=None):
    """Serve ``app`` with uvicorn in a background thread for the duration of the block.

    For tests, notebooks and benchmarks. ``port=0`` takes a free port; the block gets the
    base URL (``http://127.0.0.1:PORT``). The server stops, its connections closed, when
    the block ends. The other parameters are :func:`run`'s.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        # log_config=None: the process's logging is the caller's, not reconfigured.
        server = uvicorn.Server(_uvicorn_config(app, host, port, quiet, limit_concurrency, max_connections_per_client,
                                                header_timeout, body_timeout, log_config=None))
    except BaseException:  # a limit refused (ValueError), or the port taken
        sock.close()
        raise
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vladkit-serve")
    thread.start()
    try:
        started = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - started > 30:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.01)
        yield f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
