"""What tests/test_serve.py and tests/test_serve_browser.py share: a small real index of
15-Scene photos built through the command line, attacked copies of its images, an HTTP
client on the standard library, and raw sockets from another client address."""

from __future__ import annotations

import glob
import http.client
import os
import resource
import selectors
import shutil
import socket
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

SCENE15 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scene15")


def photos(folder, n):
    """n real photos (15-Scene test/, one class after another), copied into ``folder``."""
    by_class = [sorted(glob.glob(os.path.join(d, "*.jpg")))
                for d in sorted(glob.glob(os.path.join(SCENE15, "test", "*")))]
    if not by_class:
        pytest.skip(f"15-Scene is not at {os.path.abspath(SCENE15)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"photo_{i:02d}.jpg")
        shutil.copyfile(by_class[i % len(by_class)][i // len(by_class)], paths[-1])
    return paths


def build_index(root, n_images=40, rerank_features=True, plain=False, prepare=None):
    """Index ``n_images`` photos of ``root/db`` (sparse RootSIFT, VLAD K=16, exact) with
    the command line: {"paths", "index", "plain"}; ``plain`` also builds an index without
    re-ranking features, ``prepare(paths)`` may change the photos first. Ids are absolute
    paths."""
    from conftest import cli

    paths = photos(root / "db", n_images)
    if prepare is not None:
        prepare(paths)
    words, encodings, index = root / "words.npz", root / "photos.npz", root / "photos.index"
    steps = [("vocab", "build", root / "db", "-k", 16, "--features", "sift", "--root", "-o", words, "-q"),
             ("encode", root / "db", "--vocab", words, "-o", encodings, "-q"),
             ("index", "build", encodings, "-o", index, "-q") + (("--rerank-features",) if rerank_features else ())]
    if plain:
        steps.append(("index", "build", encodings, "-o", root / "plain.index", "-q"))
    for step in steps:
        code, _, err = cli(*step)
        assert code == 0, err
    return {"paths": [str(p) for p in paths], "index": index, "plain": root / "plain.index"}


def attacked(path, out, degrees=8, scale=0.9, crop=0.8, quality=50):
    """A near-duplicate of the image at ``path``: rotated, rescaled, cropped, recompressed."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    warped = cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)
    top, left = int(h * (1 - crop) / 2), int(w * (1 - crop) / 2)
    assert cv2.imwrite(str(out), warped[top:h - top, left:w - left], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return out


class Client:
    """HTTP on the standard library; every answer is (status, headers, body) and every
    body is kept, so that a test can check that none held a traceback."""

    def __init__(self, base):
        self.base = base
        self.bodies = []

    def request(self, path, data=None, headers=None, method=None, timeout=60):
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {},
                                         method=method or ("POST" if data is not None else "GET"))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            answer = error.code, error.headers, error.read()
        self.bodies.append(answer[2])
        return answer

    def raw(self, method, path, body=None, headers=None, chunked=False, timeout=60):
        """http.client, for what urllib normalises away: a raw query string, chunked bodies."""
        host = self.base.split("//", 1)[1]
        connection = http.client.HTTPConnection(host, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = connection.getresponse()
            answer = response.status, response.headers, response.read()
        finally:
            connection.close()
        self.bodies.append(answer[2])
        return answer


def decode(data):
    """The image encoded in ``data`` (None if it is not one)."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


#: A client that is not the tests' own (127.0.0.1): Linux routes all of 127.0.0.0/8 to the
#: loopback interface, so a socket bound to this address reaches a server on 127.0.0.1 from
#: another address, as another machine would.
OTHER_CLIENT = "127.0.0.2"


def other_client():
    """:data:`OTHER_CLIENT`, or skip where the system has no such loopback address (macOS)."""
    with socket.socket() as probe:
        try:
            probe.bind((OTHER_CLIENT, 0))
        except OSError as error:
            pytest.skip(f"cannot bind a client socket to {OTHER_CLIENT} ({error.strerror})")
    return OTHER_CLIENT


def connect(base, source=None, timeout=30):
    """A TCP connection to the server at ``base`` (``http://host:port``), from ``source``."""
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout,
                                    source_address=None if source is None else (source, 0))


def open_idle(base, n, source):
    """``n`` connections from ``source`` that send nothing (raising the soft limit on open
    files if ``n`` would pass it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 512:
        wanted = n + 512 if hard == resource.RLIM_INFINITY else min(n + 512, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return [connect(base, source) for _ in range(n)]


def closed_by_server(sockets, wait, expect=None):
    """{socket: (the bytes it received, seconds until its end)} for those of ``sockets``
    that the server closed (end of stream or reset) within ``wait`` seconds, or as soon as
    ``expect`` of them were; the others are still open."""
    received = {sock: b"" for sock in sockets}
    closed = {}
    expect = len(sockets) if expect is None else expect
    started = time.monotonic()
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = started + wait
        while len(closed) < expect and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                    continue
                closed[sock] = received[sock], time.monotonic() - started
                selector.unregister(sock)
    for sock in sockets:
        sock.settimeout(30)
    return closed
