"""`vladkit serve` (vladkit.app.serve.web): a real uvicorn server on a free localhost port, asked
over HTTP with the standard library. Search by upload and by id, thumbnails, every kind
of bad request (the server must answer it with a 4xx and a reason, never a traceback, and
keep serving), traversal and symbolic links, time limits, concurrency, idle and slow
connections, foreign Host headers (DNS rebinding), relative ids, the command."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="vladkit serve needs the serve extra (pip install 'vladkit[serve]')")
pytest.importorskip("uvicorn", reason="vladkit serve needs the serve extra (pip install 'vladkit[serve]')")
pytest.importorskip("python_multipart", reason="vladkit serve needs the serve extra (pip install 'vladkit[serve]')")

from _serve_support import (  # noqa: E402
    Client,
    attacked,
    build_index,
    closed_by_server,
    connect,
    decode,
    open_idle,
    other_client,
)
from conftest import cli  # noqa: E402
from vladkit.retrieval.index_files import IndexFileError  # noqa: E402
from vladkit.app.serve.server import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, serve_in_thread  # noqa: E402
from vladkit.app.serve.service import THUMBNAIL_SIDE  # noqa: E402
from vladkit.app.serve.web import LOOPBACK_HOSTS, RECOMMENDED_RERANK, allowed_hosts_for, create_app  # noqa: E402

MAX_UPLOAD = 1_000_000
MAX_PIXELS = 250_000  # 15-Scene photos are 200 x 200 (40,000 pixels)


LARGE = 38  # this indexed photo is enlarged to 400 x 300


def _enlarge(paths):
    image = cv2.imread(str(paths[LARGE]))
    assert cv2.imwrite(str(paths[LARGE]), cv2.resize(image, (400, 300), interpolation=cv2.INTER_CUBIC))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"root": root, **build_index(root, n_images=40, plain=True, prepare=_enlarge)}


def _still_serving_without_traceback(client):
    """Once a server's tests are done (in whatever order they ran), after every bad request
    they sent: it still answers, and none of its answers held a traceback."""
    assert client.request("/api/health")[0] == 200
    for body in client.bodies:
        assert b"Traceback" not in body and b'File "' not in body, body[:300]


@pytest.fixture(scope="module")
def server(built):
    """The main server: an index with re-ranking features, small limits."""
    app = create_app(built["index"], max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_concurrency=2)
    with serve_in_thread(app) as url:
        client = Client(url)
        yield {"url": url, "client": client, "app": app, **built}
        _still_serving_without_traceback(client)


@pytest.fixture(scope="module")
def plain(built):
    """An index without re-ranking features."""
    with serve_in_thread(create_app(built["plain"])) as url:
        client = Client(url)
        yield client
        _still_serving_without_traceback(client)


@pytest.fixture(scope="module")
def guarded(built):
    """Short connection limits: 4 connections per client, 0.5 s for a request's headers,
    1 s (the app's time limit) for its body."""
    app = create_app(built["plain"], timeout=1.0, max_concurrency=1)
    with serve_in_thread(app, max_connections_per_client=4, header_timeout=0.5) as url:
        client = Client(url)
        yield {"url": url, "client": client}
        _still_serving_without_traceback(client)


@pytest.fixture(scope="module")
def relative(built):
    """An index of the same photos whose ids are relative paths ("db/photo_00.jpg"), as
    `vladkit encode db` run in built["root"] lists them."""
    root, cwd = built["root"], os.getcwd()
    os.chdir(root)
    try:
        for step in (("encode", "db", "--vocab", "words.npz", "-o", "relative.npz", "-q"),
                     ("index", "build", "relative.npz", "-o", "relative.index", "-q")):
            code, _, err = cli(*step)
            assert code == 0, err
    finally:
        os.chdir(cwd)
    return {"root": root, "index": root / "relative.index"}


@pytest.fixture(scope="module")
def slow(built):
    """One worker, no queue and a 1 s limit: for time-outs, busy answers and crashes."""
    app = create_app(built["plain"], timeout=1.0, max_concurrency=1, max_queue=0)
    with serve_in_thread(app) as url:
        client = Client(url)
        yield {"client": client, "app": app}
        _still_serving_without_traceback(client)


def _json(answer):
    status, headers, body = answer
    assert headers["content-type"].startswith("application/json"), (status, body[:200])
    return json.loads(body)


def _error(answer, status, *words):
    """The answer is ``status`` with a JSON error that says why (each of ``words``)."""
    assert answer[0] == status, (answer[0], answer[2][:300])
    message = _json(answer)["error"]
    for word in words:
        assert word in message, message
    return message


def _jpeg(image, quality=90):
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return encoded.tobytes()


def _multipart(field, filename, data, content_type="image/jpeg"):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _png_claiming(width, height):
    """A PNG signature and header (IHDR) announcing width x height, and no pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _png_bomb(side):
    """A real, valid PNG of side x side black pixels: side^2 bytes decoded, ~1/1000 of
    that compressed (16,000 px: 256 MB from ~250 KB)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _id(path):
    return quote(str(path), safe="")


# ------------------------------------------------------------------------ what it serves


def test_health_and_info(server):
    client = server["client"]
    assert _json(client.request("/api/health")) == {"status": "ok"}
    info = _json(client.request("/api/info"))
    assert info["images"] == 40 and info["kind"] == "flat" and info["rerank"] is True
    assert info["encoder"] == "vlad" and info["words"] == 16 and info["dim"] == 16 * 128
    assert info["bytes_per_image"] == 4 * 16 * 128
    assert info["extractor"].startswith("SIFT(") and "root=True" in info["extractor"]
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "max_top": 100,
                              "max_rerank": 500, "timeout": 30.0}
    assert str(server["root"]) not in json.dumps(info)  # no server paths beyond the ids


def test_page_and_security_headers(server):
    status, headers, body = server["client"].request("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert 'id="file"' in page and 'id="results"' in page and "<script>" in page
    csp = headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    assert "http" not in page.split("<script>")[0].split("</style>")[1]  # nothing from another site
    _, api_headers, _ = server["client"].request("/api/health")
    assert api_headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in api_headers["content-security-policy"]


def test_upload_finds_the_attacked_copy_first(server, tmp_path):
    client, paths = server["client"], server["paths"]
    for target in (3, 17, 31):
        data = attacked(paths[target], tmp_path / f"copy{target}.jpg").read_bytes()
        answer = _json(client.request("/api/search?top=5", data, {"Content-Type": "image/jpeg"}))
        results = answer["results"]
        assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
        assert results[0]["id"] == paths[target], results
        assert results[0]["score"] > results[1]["score"]
        assert "inliers" not in results[0] and answer["ms"] > 0
        assert results[0]["thumbnail"] == "/api/thumbnail?id=" + _id(paths[target])
        # The same image as a multipart form (field "image") gives the same answer.
        body, headers = _multipart("image", "copy.jpg", data)
        again = _json(client.request("/api/search?top=5", body, headers))
        assert [r["id"] for r in again["results"]] == [r["id"] for r in results]


def test_rerank_puts_a_strong_copy_first(server, tmp_path):
    client, paths = server["client"], server["paths"]
    data = attacked(paths[7], tmp_path / "strong.jpg", degrees=20, scale=0.7, crop=0.6, quality=40).read_bytes()
    plain = _json(client.request("/api/search?top=10", data))["results"]
    reranked = _json(client.request("/api/search?top=10&rerank=40", data))["results"]
    assert reranked[0]["id"] == paths[7] and reranked[0]["inliers"] >= 8
    assert all("inliers" in r for r in reranked)
    scores = {r["id"]: r["score"] for r in plain}
    assert all(r["score"] == scores[r["id"]] for r in reranked if r["id"] in scores)  # global scores kept


def test_search_by_id(server):
    client, paths = server["client"], server["paths"]
    answer = _json(client.request(f"/api/search?id={_id(paths[12])}&top=3"))
    assert answer["query"]["id"] == paths[12]
    results = answer["results"]
    assert len(results) == 3 and results[0]["id"] == paths[12] and results[0]["score"] > 0.99
    # Following a result's own link searches with that image.
    follow = _json(client.request(results[1]["search"] + "&top=2&rerank=5"))
    assert follow["results"][0]["id"] == results[1]["id"] and follow["results"][0]["inliers"] > 20


def test_thumbnail_is_a_small_jpeg_of_an_indexed_image(server):
    client, paths = server["client"], server["paths"]
    status, headers, body = client.request(f"/api/thumbnail?id={_id(paths[5])}")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    image = decode(body)
    assert image is not None and max(image.shape[:2]) <= THUMBNAIL_SIDE
    original = cv2.imread(paths[5])
    assert image.shape == original.shape  # 200 x 200: not enlarged
    assert np.abs(image.astype(int) - original).mean() < 8
    assert client.request(f"/api/thumbnail?id={_id(paths[5])}")[2] == body  # from the cache


def test_thumbnail_of_a_larger_image_is_bounded(server):
    client, large = server["client"], server["paths"][LARGE]
    status, _, body = client.request(f"/api/thumbnail?id={_id(large)}")
    assert status == 200 and decode(body).shape == (192, THUMBNAIL_SIDE, 3)  # 400 x 300, long side 256


# --------------------------------------------------------------------- refused requests


def test_oversized_uploads_413(server):
    client = server["client"]
    big = os.urandom(MAX_UPLOAD + 1000)
    # Content-Length over the limit: refused before reading the body.
    _error(client.request("/api/search", big, {"Content-Type": "image/jpeg"}), 413, "limit", f"{MAX_UPLOAD:,}")
    # No Content-Length (chunked): refused as the running total passes the limit.
    chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
    _error(client.raw("POST", "/api/search", iter(chunks), {"Content-Type": "image/jpeg",
                                                            "Transfer-Encoding": "chunked"}, chunked=True),
           413, "limit")
    # The same inside a multipart form.
    body, headers = _multipart("image", "big.jpg", big)
    _error(client.request("/api/search", body, headers), 413, "limit")


def test_bad_images_400(server, tmp_path):
    client, paths = server["client"], server["paths"]
    jpeg = Path(paths[0]).read_bytes()
    _error(client.request("/api/search", jpeg[:len(jpeg) // 2]), 400, "truncated or corrupt")
    # A GIF header (10 x 10) followed by garbage; the same header claiming more pixels
    # than allowed is refused first, for its size.
    _error(client.request("/api/search", b"GIF89a\x0a\x00\x0a\x00" + b"not really an image" * 10), 400,
           "cannot be read")
    _error(client.request("/api/search", b"GIF89a but not really an image" * 10), 413, "pixels")
    _error(client.request("/api/search", b"%PDF-1.7\n" + os.urandom(5000)), 400, "not an image")
    _error(client.request("/api/search", b"hello world"), 400, "not an image")
    _error(client.request("/api/search", b""), 400, "empty")
    _error(client.request("/api/search", os.urandom(20000)), 400)
    # A multipart form without the "image" field, and a broken one.
    body, headers = _multipart("photo", "x.jpg", jpeg)
    _error(client.request("/api/search", body, headers), 400, "'image'")
    _error(client.request("/api/search", b"--nothing--", {"Content-Type": "multipart/form-data; boundary=x"}), 400)
    _error(client.request("/api/search", jpeg, {"Content-Type": "multipart/form-data"}), 400)


def test_decompression_bombs_refused_before_decoding(server):
    client = server["client"]
    # A header that claims 100,000 x 100,000 pixels, and nothing after it.
    message = _error(client.request("/api/search", _png_claiming(100_000, 100_000)), 413,
                     "10,000,000,000 pixels", "decompression")
    assert f"{MAX_PIXELS:,}" in message
    # A real bomb: a valid 16,000 x 16,000 PNG (256 MB of pixels) in ~250 KB.
    bomb = _png_bomb(16_000)
    assert len(bomb) < MAX_UPLOAD
    started = time.monotonic()
    _error(client.request("/api/search", bomb), 413, "16000 x 16000")
    assert time.monotonic() - started < 5  # refused from the header, not after decoding
    # A real photo just over the pixel limit (600 x 450 = 270,000 > 250,000).
    _error(client.request("/api/search", _jpeg(np.full((450, 600, 3), 128, np.uint8))), 413, "600 x 450")


def test_unknown_ids_and_traversal_404(server):
    client, paths = server["client"], server["paths"]
    indexed = Path(paths[0])
    attempts = ["../../etc/passwd", "/etc/passwd", str(indexed.parent / ".." / indexed.parent.name / indexed.name),
                str(indexed) + "/", str(indexed).upper(), indexed.name, "photo_00.jpg", "", "\x00",
                str(indexed) + "\x00.jpg", "nope"]
    for image_id in attempts:
        for endpoint in ("thumbnail", "search"):
            _error(client.request(f"/api/{endpoint}?id={_id(image_id)}"), 404, "no indexed image")
    # Percent-encoded dots and slashes as they come, and double encodings, never reach a path.
    for query in ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2F..%2Fetc%2Fpasswd", "%252e%252e%252fetc%252fpasswd",
                  "%2Fetc%2Fpasswd", "%c0%ae%c0%ae%2fetc%2fpasswd", "%ff%fe"):
        for endpoint in ("thumbnail", "search"):
            _error(client.raw("GET", f"/api/{endpoint}?id={query}"), 404, "no indexed image")
    # A path in the URL instead of a query parameter is no route.
    _error(client.raw("GET", "/api/thumbnail/../../etc/passwd"), 404)
    _error(client.raw("GET", "/../../etc/passwd"), 404)


def test_symbolic_links_planted_after_startup(server, tmp_path):
    client, paths = server["client"], server["paths"]
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(Path(paths[1]).read_bytes())
    folder = Path(paths[0]).parent
    # A new link in the indexed folder: not an indexed id.
    planted = folder / "planted.jpg"
    planted.symlink_to(outside)
    try:
        for endpoint in ("thumbnail", "search"):
            _error(client.request(f"/api/{endpoint}?id={_id(planted)}"), 404, "no indexed image")
    finally:
        planted.unlink()
    # An indexed file replaced by a link to a file outside: refused, for both uses.
    target = Path(paths[39])
    kept = target.with_name("kept.bin")
    target.rename(kept)
    try:
        target.symlink_to(outside)
        for endpoint in ("thumbnail", "search"):
            _error(client.request(f"/api/{endpoint}?id={_id(target)}"), 403, "symbolic link")
        target.unlink()
        # ... by a FIFO (opening it would block a worker forever): refused.
        os.mkfifo(target)
        _error(client.request(f"/api/thumbnail?id={_id(target)}"), 403, "regular file")
        target.unlink()
        # ... gone: 404.
        _error(client.request(f"/api/thumbnail?id={_id(target)}"), 404, "no longer there")
    finally:
        if target.is_symlink() or target.exists():
            target.unlink()
        kept.rename(target)
    # The indexed folder itself swapped for a link to a copy elsewhere: refused.
    moved = folder.with_name(folder.name + "-moved")
    folder.rename(moved)
    try:
        folder.symlink_to(moved)
        _error(client.request(f"/api/thumbnail?id={_id(paths[2])}"), 403, "symbolic link")
    finally:
        if folder.is_symlink():
            folder.unlink()
        moved.rename(folder)
    # Everything back as indexed: served again.
    assert client.request(f"/api/thumbnail?id={_id(target)}")[0] == 200
    assert client.request(f"/api/thumbnail?id={_id(paths[2])}")[0] == 200


def test_bad_parameters_400(server):
    client, paths = server["client"], server["paths"]
    data = Path(paths[0]).read_bytes()
    for query, name in (("top=0", "top"), ("top=101", "top"), ("top=ten", "top"), ("top=-1", "top"),
                        ("top=1e3", "top"), ("top=99999999999999999999", "top"), ("top=1&top=2", "top"),
                        ("rerank=-1", "rerank"), ("rerank=501", "rerank"), ("rerank=x", "rerank")):
        _error(client.request(f"/api/search?{query}", data), 400, f"'{name}'")
        _error(client.request(f"/api/search?id={_id(paths[0])}&{query}"), 400, f"'{name}'")
    _error(client.request("/api/search"), 400, "id")
    _error(client.request("/api/thumbnail"), 400, "id")
    _error(client.request(f"/api/search?id={_id(paths[0])}", data), 400, "POST")
    # (A malformed Content-Length is refused by uvicorn's HTTP parser itself, in plain text.)
    assert _malformed_content_length(client).startswith(b"HTTP/1.1 400 ")
    _error(client.request("/api/search", method="DELETE"), 405)
    _error(client.request("/api/health", b"x"), 405)
    _error(client.request("/api/nothing"), 404)


def _malformed_content_length(client):
    """The raw answer to a POST whose Content-Length is not a number.

    uvicorn answers 400 and closes at once, before the body it cannot delimit; the close
    may reach the client as a reset after the answer (not before it), so the answer is
    read from a plain socket up to EOF or that reset."""
    host, port = client.base.split("//", 1)[1].rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nabc")
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    client.bodies.append(answer)
    return answer


def test_rerank_without_features_400(plain, server):
    data = Path(server["paths"][0]).read_bytes()
    _error(plain.request("/api/search?rerank=10", data), 400, "no re-ranking features", "--rerank-features")
    _error(plain.request(f"/api/search?id={_id(server['paths'][0])}&rerank=10"), 400, "re-ranking")
    assert _json(plain.request("/api/info"))["limits"]["max_rerank"] == 0
    assert _json(plain.request("/api/search?top=3", data))["results"][0]["id"] == server["paths"][0]


# ----------------------------------------------------------------- load, time, failures


def test_concurrent_requests_all_succeed(server, tmp_path):
    client, paths = server["client"], server["paths"]
    copies = {i: attacked(paths[i], tmp_path / f"c{i}.jpg").read_bytes() for i in range(0, 40, 5)}

    def upload(i):
        return i, client.request("/api/search?top=3", copies[i])

    def by_id(i):
        return i, client.request(f"/api/search?id={_id(paths[i])}&top=3&rerank=5")

    def thumbnail(i):
        return i, client.request(f"/api/thumbnail?id={_id(paths[i])}")

    jobs = [(f, i) for i in copies for f in (upload, by_id, thumbnail)] * 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: (job[0].__name__,) + job[0](job[1]), jobs))
    assert len(answers) == 48
    for kind, i, (status, headers, body) in answers:
        assert status == 200, (kind, body[:200])
        if kind != "thumbnail":
            assert json.loads(body)["results"][0]["id"] == paths[i], kind
        else:
            assert decode(body) is not None


def test_time_limit_and_busy_503(slow, server):
    client, service = slow["client"], slow["app"].state.service
    data = Path(server["paths"][0]).read_bytes()
    original, finished, entered = service._search_bytes, [], threading.Event()

    def sluggish(*args):
        entered.set()
        time.sleep(2.5)
        try:
            args[-1]()  # the deadline check: the abandoned work stops here
        except Exception as error:
            finished.append(type(error).__name__)
            raise
        return original(*args)

    service._search_bytes = sluggish
    try:
        answers = {}

        def first():
            answers["first"] = client.request("/api/search", data)

        thread = threading.Thread(target=first)
        started = time.monotonic()
        thread.start()
        assert entered.wait(10)
        # The only worker is taken and there is no queue: busy, at once.
        busy = client.request("/api/search", data)
        assert busy[0] == 503 and busy[1]["retry-after"] == "1" and "busy" in json.loads(busy[2])["error"]
        assert _json(client.request("/api/health")) == {"status": "ok"}  # the event loop is free
        thread.join(10)
        elapsed = time.monotonic() - started
        _error(answers["first"], 503, "time limit of 1 s")
        assert elapsed < 2.3  # answered at the limit, not when the work ended
        while not finished and time.monotonic() - started < 15:
            time.sleep(0.1)
        assert finished == ["_Expired"]  # and the abandoned work stopped at its next check
    finally:
        service._search_bytes = original
    assert client.request("/api/search?top=1", data)[0] == 200


def test_internal_errors_are_short_500s(slow, server, caplog):
    client, service = slow["client"], slow["app"].state.service
    data = Path(server["paths"][0]).read_bytes()

    def broken(*args):
        raise RuntimeError("boom: a secret detail")

    original, service._search_bytes = service._search_bytes, broken
    try:
        with caplog.at_level("ERROR", logger="vladkit.app.serve.web"):
            answer = client.request("/api/search", data)
    finally:
        service._search_bytes = original
    message = _error(answer, 500, "internal")
    assert "boom" not in message and b"Traceback" not in answer[2]
    assert "boom: a secret detail" in caplog.text and "Traceback" in caplog.text  # logged on the server
    assert client.request("/api/search?top=1", data)[0] == 200


def test_ids_with_bytes_that_are_not_utf8_round_trip():
    """A file name that is not UTF-8 (an id with surrogate escapes) travels in the links the
    server builds as its bytes, and comes back as the same id."""
    from types import SimpleNamespace

    from vladkit.app.serve.web import _query
    from vladkit.app.serve.service import _quote

    for name in (os.fsdecode(b"/photos/caf\xe9 \xff.jpg"), "/photos/été & co?.jpg", "a+b=c%d#e"):
        request = SimpleNamespace(scope={"query_string": f"id={_quote(name)}&top=3".encode()})
        assert _query(request) == {"id": [name], "top": ["3"]}
        assert json.loads(json.dumps(name, ensure_ascii=True)) == name


# --------------------------------------------------- connections, hosts, methods (issue 29)


def _health_seconds(client, n):
    """The median time of ``n`` health requests, each of which must answer 200."""
    seconds = []
    for _ in range(n):
        started = time.perf_counter()
        assert _json(client.request("/api/health")) == {"status": "ok"}
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[n // 2]


def test_idle_connections_of_one_client_do_not_lock_out_others(server):
    """1,000 connections that send nothing, from one client, with the default limits: the
    server answers everyone else as fast as before (uvicorn alone answered every request
    503 once 256 were open, for as long as they stayed open); all but 16 of them are
    answered 503 and closed at once, the 16 by the header timeout."""
    client, url = server["client"], server["url"]
    quiet = _health_seconds(client, 9)
    idle = open_idle(url, 1000, other_client())
    try:
        under_attack = _health_seconds(client, 9)
        assert under_attack < 5 * quiet + 0.05, (quiet, under_attack)
        assert _json(client.request(f"/api/search?id={_id(server['paths'][3])}&top=1"))["results"][0]["id"] \
            == server["paths"][3]
        cap = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
        refused = closed_by_server(idle, wait=10, expect=len(idle) - cap)
        assert len(refused) == len(idle) - cap
        for answer, seconds in refused.values():
            assert answer.startswith(b"HTTP/1.1 503 ") and b"too many connections" in answer, answer[:300]
            assert b"retry-after: 1" in answer.lower()
        assert max(seconds for _, seconds in refused.values()) < 8  # at once, not at the header timeout
    finally:
        for sock in idle:
            sock.close()


class _Trickle(threading.Thread):
    """Sends ``first``, then ``each`` every ``every`` seconds until the connection fails or
    :meth:`stop`: a client that keeps a request from ever being complete."""

    def __init__(self, sock, first, each, every=0.1):
        super().__init__(daemon=True)
        self.sock, self.first, self.each, self.every = sock, first, each, every
        self.stopped = threading.Event()

    def run(self):
        try:
            self.sock.sendall(self.first)
            while not self.stopped.wait(self.every):
                self.sock.sendall(self.each)
        except OSError:
            pass

    def stop(self):
        self.stopped.set()
        self.join(10)


def test_idle_and_slow_headers_are_closed(guarded):
    """A connection that sends nothing is closed at the header timeout (0.5 s here); one
    that trickles header lines (slowloris) too, with a 408. uvicorn kept both open."""
    url = guarded["url"]
    idle, slow = connect(url), connect(url)
    trickle = _Trickle(slow, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Slow: 1\r\n")
    trickle.start()
    try:
        closed = closed_by_server([idle, slow], wait=5)
    finally:
        trickle.stop()
        idle.close()
        slow.close()
    assert set(closed) == {idle, slow}, "still open after 5 s"
    assert closed[idle][0] == b"" and 0.3 < closed[idle][1] < 4
    answer, seconds = closed[slow]
    assert answer.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive" in answer and 0.3 < seconds < 4
    assert _json(guarded["client"].request("/api/health")) == {"status": "ok"}


def test_slow_bodies_are_closed(guarded):
    """A body that never ends is cut at the body timeout (the app's limit, 1 s here):
    answered or not, the connection is closed. uvicorn kept both open while bytes came."""
    url = guarded["url"]
    # The app answers without reading the body; the client goes on sending it.
    ignored = connect(url)
    ignored_trickle = _Trickle(ignored, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                        b"Content-Length: 100000\r\n\r\n", b"x")
    # The app reads the body, and answers 408 at its own time limit, before the close.
    upload = connect(url)
    upload_trickle = _Trickle(upload, b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n", b"x")
    ignored_trickle.start()
    upload_trickle.start()
    try:
        closed = closed_by_server([ignored, upload], wait=6)
    finally:
        for trickle, sock in ((ignored_trickle, ignored), (upload_trickle, upload)):
            trickle.stop()
            sock.close()
    assert set(closed) == {ignored, upload}, "still open after 6 s"
    answer, seconds = closed[ignored]
    assert answer.startswith(b"HTTP/1.1 200 ") and b'{"status": "ok"}' in answer and 0.8 < seconds < 5
    answer, seconds = closed[upload]
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within" in answer and 0.8 < seconds < 5


def test_keep_alive_outlasts_the_header_timeout(guarded):
    """The header timeout counts from a request's first byte, not from the connection's
    opening: a kept-alive connection serves a request sent after it (0.8 s > 0.5 s)."""
    host, port = guarded["url"].split("//", 1)[1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for pause in (0, 0.8):
            time.sleep(pause)
            connection.request("GET", "/api/health")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
            if not pause:
                first = connection.sock
        assert connection.sock is first  # the same connection, not a new one
    finally:
        connection.close()


def test_connections_are_capped_per_client(guarded):
    """One client holds at most 4 connections here: a 5th is answered 503 at once; other
    clients are not affected, and the client is served again once its idle ones are
    closed (by the header timeout). uvicorn accepted up to 256."""
    url, other = guarded["url"], other_client()
    held = [connect(url, other) for _ in range(4)]
    try:
        time.sleep(0.1)  # accepted, and counted, by the server
        extra = connect(url, other)
        refused = closed_by_server([extra], wait=0.4)  # well before the header timeout
        extra.close()
        assert extra in refused, "the 5th connection was kept"
        assert refused[extra][0].startswith(b"HTTP/1.1 503 ") and b"too many connections" in refused[extra][0]
        assert _json(guarded["client"].request("/api/health")) == {"status": "ok"}  # another client
        assert len(closed_by_server(held, wait=4)) == 4  # the held ones, by the header timeout
    finally:
        for sock in held:
            sock.close()
    again = connect(url, other)
    try:
        again.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := again.recv(65536):
            answer += chunk
    finally:
        again.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def _with_host(client, method, path, host, body=None):
    """(status, headers, body) of a request carrying the Host header ``host``."""
    return client.raw(method, path, body=body, headers={"Host": host, "Content-Type": "image/jpeg"})


def test_foreign_host_headers_400(server):
    """DNS rebinding: a page of another site whose domain now resolves to 127.0.0.1 reads
    what the server answers to that domain. Only this machine's own names are answered
    (uvicorn answered any Host: the ids, that is the paths, and the photos)."""
    client, paths = server["client"], server["paths"]
    port = server["url"].rsplit(":", 1)[1]
    photo = Path(paths[0]).read_bytes()
    requests = [("GET", "/"), ("GET", "/api/info"), ("GET", f"/api/thumbnail?id={_id(paths[1])}"),
                ("GET", f"/api/search?id={_id(paths[1])}"), ("POST", "/api/search")]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.",
                 "[::2]", "127.0.0.2"):
        for method, path in requests:
            answer = _with_host(client, method, path, host, photo if method == "POST" else None)
            message = _error(answer, 400, "--allowed-host", "localhost, 127.0.0.1, [::1]")
            assert host in message and b"photo_" not in answer[2] and answer[1]["x-content-type-options"]
    for host in ("localhost", f"localhost:{port}", "LOCALHOST", "127.0.0.1", f"127.0.0.1:{port}", "[::1]",
                 f"[::1]:{port}"):
        assert _with_host(client, "GET", "/api/info", host)[0] == 200, host
    # A request without a Host header (HTTP/1.0 allows it) does not name this server either.
    host, port = server["url"].split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /api/info HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") and b"photo_" not in answer
    client.bodies.append(answer)


def test_connections_count_against_an_address_or_an_ipv6_64():
    """One IPv6 client usually has a /64 to pick addresses from: it counts as one."""
    from vladkit.app.serve.server import _client_key

    assert _client_key("10.1.2.3") == "10.1.2.3" != _client_key("10.1.2.4")
    assert _client_key("2001:db8:1:2::1") == _client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert _client_key("2001:db8:1:3::1") != _client_key("2001:db8:1:2::1")
    assert _client_key("::ffff:10.1.2.3") == "10.1.2.3"  # IPv4 through a dual-stack socket
    assert _client_key("fe80::1%eth0") == "fe80::/64"


def test_allowed_hosts_for_a_bound_address():
    assert allowed_hosts_for("127.0.0.1") == LOOPBACK_HOSTS
    assert allowed_hosts_for("::1") == LOOPBACK_HOSTS
    assert allowed_hosts_for("192.168.1.20", ["Photos.LAN"]) == (*LOOPBACK_HOSTS, "192.168.1.20", "photos.lan")
    assert allowed_hosts_for("fe80::1") == (*LOOPBACK_HOSTS, "[fe80::1]")
    assert allowed_hosts_for("0.0.0.0", ["*"]) == (*LOOPBACK_HOSTS, "*")
    for wildcard in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="--allowed-host"):
            allowed_hosts_for(wildcard)
    for bad in ("a*b.org", "*example.org", "user@host", "a/b", ""):
        with pytest.raises(ValueError, match="allowed_hosts"):
            allowed_hosts_for("127.0.0.1", [bad])


def test_options_lists_the_routed_methods(server):
    """A method the path does not take is 405 with every method it does take (GET was
    left out of /api/search's Allow: its two methods were two routes)."""
    client = server["client"]
    for method in ("OPTIONS", "PUT", "DELETE"):
        answer = client.raw(method, "/api/search")
        _error(answer, 405)
        assert sorted(m.strip() for m in answer[1]["allow"].split(",")) == ["GET", "HEAD", "POST"], method
    answer = client.raw("OPTIONS", "/api/health")
    assert answer[0] == 405 and sorted(m.strip() for m in answer[1]["allow"].split(",")) == ["GET", "HEAD"]


def test_info_gives_the_page_the_recommended_rerank_depth(server, plain):
    """The page's "re-rank the top" field starts at README's recommended depth when the
    index has re-ranking features (it started at 0), at 0 when it has none."""
    assert _json(server["client"].request("/api/info"))["default_rerank"] == RECOMMENDED_RERANK["flat"] == 100
    assert RECOMMENDED_RERANK["pq"] == RECOMMENDED_RERANK["ivfpq"] == 200
    assert _json(plain.request("/api/info"))["default_rerank"] == 0
    page = server["client"].request("/")[2].decode()
    assert "info.default_rerank" in page  # what the page sets the field to (the browser test checks it)


def test_relative_ids_need_their_root(relative, tmp_path, monkeypatch):
    """Ids relative to the folder `vladkit encode` ran in: served from another folder, the
    service refuses to start, saying why (it started, and answered 404 for every
    thumbnail); given that folder, it serves them."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IndexFileError, match="relative") as refused:
        create_app(relative["index"])
    assert "'db/photo_00.jpg'" in str(refused.value) and "--image-root" in str(refused.value)
    app = create_app(relative["index"], image_root=relative["root"])
    with serve_in_thread(app) as url:
        client = Client(url)
        status, headers, body = client.request("/api/thumbnail?id=" + _id("db/photo_05.jpg"))
        assert status == 200 and decode(body) is not None
        answer = _json(client.request("/api/search?top=1&id=" + _id("db/photo_05.jpg")))
        assert answer["results"][0]["id"] == "db/photo_05.jpg"


# --------------------------------------------------------------------------- the command


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_answers_and_stops_on_ctrl_c(built):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "vladkit", "serve", str(built["index"]), "--port", str(port),
                                "--max-upload-mb", "0.5", "--timeout", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client, deadline = Client(f"http://127.0.0.1:{port}"), time.monotonic() + 90
        while True:
            try:
                if client.request("/api/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.2)
        info = _json(client.request("/api/info"))
        assert info["images"] == 40 and info["limits"]["max_upload_bytes"] == 500_000
        assert info["limits"]["timeout"] == 20.0
        data = Path(built["paths"][4]).read_bytes()
        assert _json(client.request("/api/search?top=1", data))["results"][0]["id"] == built["paths"][4]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err[-2000:]
    assert f"at http://127.0.0.1:{port}/" in err and "40 images, re-ranking available" in err
    assert "Traceback" not in err


def _launch(arguments, port, cwd=None):
    """`vladkit serve ARGUMENTS --port PORT` in a subprocess (this checkout's vladkit, from
    any ``cwd``)."""
    return subprocess.Popen([sys.executable, "-m", "vladkit", "serve", *map(str, arguments), "--port",
                             str(port)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (
                                str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))))})


def _ready(process, port):
    """A client of the launched server once it answers /api/health (or once it stopped)."""
    client, deadline = Client(f"http://127.0.0.1:{port}"), time.monotonic() + 90
    while process.poll() is None:
        try:
            if client.request("/api/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.communicate()
            raise AssertionError("the server neither answered nor stopped within 90 s")
        time.sleep(0.2)
    return client


def _stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_cli_serve_from_another_folder(relative, tmp_path):
    """The command, started away from the folder the ids are relative to: it stops at once
    and says why (it served, and every thumbnail was a 404); with --image-root it serves
    them, answers for --allowed-host names only, and closes idle connections at
    --header-timeout."""
    # Both at once: each pays Python's start and the loading.
    lost_port, port = _free_port(), _free_port()
    lost = _launch([relative["index"]], lost_port, cwd=tmp_path)
    process = _launch([relative["index"], "--image-root", relative["root"], "--allowed-host", "photos.lan",
                       "--header-timeout", "0.5", "-q"], port, cwd=tmp_path)
    try:
        client = _ready(lost, lost_port)
        if lost.poll() is None:  # it served: show what it answered
            thumbnail = client.request("/api/thumbnail?id=" + _id("db/photo_05.jpg"))
            raise AssertionError(f"it served; a thumbnail answered {thumbnail[0]} {thumbnail[2][:200]!r}")
        err = lost.communicate()[1]
        assert lost.returncode == 1 and "relative" in err and "--image-root" in err and "Traceback" not in err

        client = _ready(process, port)
        assert process.poll() is None, process.communicate()[1][-2000:]
        status, _, body = client.request("/api/thumbnail?id=" + _id("db/photo_05.jpg"))
        assert status == 200 and decode(body) is not None
        assert client.raw("GET", "/api/info", headers={"Host": "photos.lan:80"})[0] == 200
        _error(client.raw("GET", "/api/info", headers={"Host": "attacker.example"}), 400, "photos.lan")
        idle = connect(client.base)
        closed = closed_by_server([idle], wait=5)
        idle.close()
        assert idle in closed and closed[idle][1] < 4
    finally:
        _stop(lost)
        _, err = _stop(process)
    assert process.returncode == 0 and "Traceback" not in err, err[-2000:]


def test_cli_serve_on_a_taken_port_exits_1(built):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = cli("serve", built["plain"], "--port", taken.getsockname()[1], "-q")
    assert code == 1 and "could not serve on 127.0.0.1:" in err


def test_cli_serve_without_the_extra_exits_2(built, monkeypatch):
    monkeypatch.delitem(sys.modules, "vladkit.app.serve.server", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    code, out, err = cli("serve", built["index"])
    assert code == 2 and "serve extra" in err and "pip install 'vladkit[serve]'" in err and "uvicorn" in err


def test_cli_serve_usage_and_missing_index(tmp_path):
    assert cli("serve", tmp_path / "nothing")[0] == 1
    assert "no index folder" in cli("serve", tmp_path / "nothing")[2]
    assert cli("serve", tmp_path, "--port", "70000")[0] == 2
    assert cli("serve", tmp_path, "--max-upload-mb", "0")[0] == 2
    assert cli("serve", tmp_path, "--timeout", "-1")[0] == 2
    assert cli("serve", tmp_path, "--header-timeout", "0")[0] == 2
    assert cli("serve", tmp_path, "--max-connections-per-client", "-1")[0] == 2
    # Every interface, and no name for the clients to use: what is needed is said.
    code, _, err = cli("serve", tmp_path, "--host", "0.0.0.0")
    assert code == 2 and "--allowed-host" in err and "DNS rebinding" in err
    code, _, err = cli("serve", tmp_path, "--allowed-host", "a*b")
    assert code == 2 and "'a*b'" in err


def test_create_app_checks_its_limits(built):
    for option in ({"max_upload_bytes": 0}, {"timeout": 0}, {"max_concurrency": 0}, {"max_pixels": 0},
                   {"max_queue": -1}, {"timeout": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(option))):
            create_app(built["plain"], **option)
    with pytest.raises(FileNotFoundError):
        create_app(built["root"] / "nothing")
    for hosts in ("localhost", [], ["a*b"], [None]):
        with pytest.raises(ValueError, match="allowed_hosts"):
            create_app(built["plain"], allowed_hosts=hosts)
    app = create_app(built["plain"])
    for option in ({"max_connections_per_client": -1}, {"header_timeout": 0}, {"body_timeout": float("nan")},
                   {"max_connections_per_client": 1.5}):
        with pytest.raises(ValueError, match=next(iter(option))):
            with serve_in_thread(app, **option):
                pass
