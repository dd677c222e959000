"""``vladkit serve``: a search service over an index folder, and a web page to look at results.

An ASGI application (Starlette, served by uvicorn) built by :func:`create_app`:

* ``GET /`` -- a page (``vladkit/app/serve/static/index.html``: plain JavaScript, no framework, no
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

This module holds the application (:func:`create_app`: routes, limits, the page, the
security headers and the host check); :mod:`vladkit.app.serve.service` the search it
runs in worker threads; :mod:`vladkit.app.serve.server` the HTTP server (:func:`run`,
:func:`serve_in_thread`) and its guards on connections.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterable
from importlib import resources
from urllib.parse import parse_qs

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ...pipeline.budget import DEFAULT_MAX_MEMORY
from ...features.images import DEFAULT_MAX_PIXELS
from .service import (DEFAULT_TIMEOUT, THUMBNAIL_CACHE_BYTES, THUMBNAIL_SIDE, _Deadline, _Expired, _Runner,
    SearchService, ServiceError)

# Starlette imports python-multipart only when it parses a form: without it, every upload
# would fail. Imported now, so that a missing one fails at startup, naming itself.
importlib.import_module("python_multipart")

__all__ = ["LOOPBACK_HOSTS", "allowed_hosts_for", "create_app"]

logger = logging.getLogger("vladkit.app.serve.web")

#: Default cap on a request body: a phone photo is 2-12 MB.
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000
#: Default bounds of the ``top`` and ``rerank`` query parameters.
MAX_TOP, MAX_RERANK = 100, 500
#: The Host headers answered by default: this machine's own names. A page of another site
#: that rebinds its domain to 127.0.0.1 sends its own domain, and is refused.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: The re-ranking depths README's "Finding near-duplicates" recommends: 100 on an exact
#: index; 200 on a quantized one (its top 200 holds more of the copies than its top 100,
#: for ~0.1-0.2 s more a query). The page starts its "re-rank the top" field there.
RECOMMENDED_RERANK = {"flat": 100, "pq": 200, "ivfpq": 200}


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
    text = resources.files("vladkit.app.serve").joinpath("static").joinpath("index.html").read_text(encoding="utf-8")

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
    FileNotFoundError, IndexFileError, vladkit.pipeline.recipe.EncodingsFileError
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
    info = service.info()
    default_rerank = min(RECOMMENDED_RERANK.get(info["kind"], 100), limits["max_rerank"])
    info = {**info, "default_rerank": default_rerank, "limits": limits}

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
