"""`vladkit serve` (vladkit.serve): a real uvicorn server on a free localhost port, asked
over HTTP with the standard library. Search by upload and by id, thumbnails, every kind
of bad request (the server must answer it with a 4xx and a reason, never a traceback, and
keep serving), traversal and symbolic links, time limits, concurrency, the command."""

from __future__ import annotations

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

from _serve_support import Client, attacked, build_index, decode  # noqa: E402
from conftest import cli  # noqa: E402
from vladkit.serve import THUMBNAIL_SIDE, create_app, serve_in_thread  # noqa: E402

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


@pytest.fixture(scope="module")
def server(built):
    """The main server: an index with re-ranking features, small limits."""
    app = create_app(built["index"], max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_concurrency=2)
    with serve_in_thread(app) as url:
        yield {"url": url, "client": Client(url), "app": app, **built}


@pytest.fixture(scope="module")
def plain(built):
    """An index without re-ranking features."""
    with serve_in_thread(create_app(built["plain"])) as url:
        yield Client(url)


@pytest.fixture(scope="module")
def slow(built):
    """One worker, no queue and a 1 s limit: for time-outs, busy answers and crashes."""
    app = create_app(built["plain"], timeout=1.0, max_concurrency=1, max_queue=0)
    with serve_in_thread(app) as url:
        yield {"client": Client(url), "app": app}


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
        with caplog.at_level("ERROR", logger="vladkit.serve"):
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

    from vladkit.serve import _query, _quote

    for name in (os.fsdecode(b"/photos/caf\xe9 \xff.jpg"), "/photos/été & co?.jpg", "a+b=c%d#e"):
        request = SimpleNamespace(scope={"query_string": f"id={_quote(name)}&top=3".encode()})
        assert _query(request) == {"id": [name], "top": ["3"]}
        assert json.loads(json.dumps(name, ensure_ascii=True)) == name


# --------------------------------------------------------------------------- the command


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_answers_and_stops_on_ctrl_c(built):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "vladkit.cli", "serve", str(built["index"]), "--port", str(port),
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


def test_cli_serve_on_a_taken_port_exits_1(built):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = cli("serve", built["plain"], "--port", taken.getsockname()[1], "-q")
    assert code == 1 and "could not serve on 127.0.0.1:" in err


def test_cli_serve_without_the_extra_exits_2(built, monkeypatch):
    monkeypatch.delitem(sys.modules, "vladkit.serve", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    code, out, err = cli("serve", built["index"])
    assert code == 2 and "serve extra" in err and "pip install 'vladkit[serve]'" in err and "uvicorn" in err


def test_cli_serve_usage_and_missing_index(tmp_path):
    assert cli("serve", tmp_path / "nothing")[0] == 1
    assert "no index folder" in cli("serve", tmp_path / "nothing")[2]
    assert cli("serve", tmp_path, "--port", "70000")[0] == 2
    assert cli("serve", tmp_path, "--max-upload-mb", "0")[0] == 2
    assert cli("serve", tmp_path, "--timeout", "-1")[0] == 2


def test_create_app_checks_its_limits(built):
    for option in ({"max_upload_bytes": 0}, {"timeout": 0}, {"max_concurrency": 0}, {"max_pixels": 0},
                   {"max_queue": -1}, {"timeout": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(option))):
            create_app(built["plain"], **option)
    with pytest.raises(FileNotFoundError):
        create_app(built["root"] / "nothing")


# ------------------------------------------------------------------------------- at last


def test_still_serving_and_no_traceback_anywhere(server, plain, slow):
    """After every bad request above, the servers answer, and no answer held a traceback."""
    for client in (server["client"], plain, slow["client"]):
        assert _json(client.request("/api/health")) == {"status": "ok"}
        assert len(client.bodies) > 1
        for body in client.bodies:
            assert b"Traceback" not in body and b'File "' not in body
    assert len(server["client"].bodies) > 150
