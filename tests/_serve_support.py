"""What tests/test_serve.py and tests/test_serve_browser.py share: a small real index of
15-Scene photos built through the command line, attacked copies of its images, and an
HTTP client on the standard library."""

from __future__ import annotations

import glob
import http.client
import os
import shutil
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
