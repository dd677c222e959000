"""Synthetic 12-megapixel "phone photos" for benchmarks that need large real-looking JPEGs.

A photo is a mosaic of 15-Scene images (``../shared/data/scene15/train``, 200 x 200, all
classes): the frame is cut recursively into rectangles with sides of 200 to 800 pixels,
and each rectangle is filled with a randomly chosen scene image upscaled by 1x to 4x
(``cv2.INTER_CUBIC``, aspect ratio kept, centre-cropped to the rectangle). Gaussian noise
(sigma 3 grey levels per channel) is added so that the upscaled tiles have fine-scale
texture as a real sensor image does, and the photo is saved as a JPEG (quality 92, about a
phone camera's). Everything is seeded: the same seed gives the same pixels.

    from phone_photos import write_phone_photos
    paths = write_phone_photos("/tmp/vladkit-phone-photos", 3)   # 4032 x 3024 each
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from vladkit import list_images

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scene15"
TILE_MIN, TILE_MAX = 200, 800  # rectangle sides: 1x to 4x the 200-pixel scene images
NOISE_SIGMA = 3.0  # grey levels, per channel


def _rectangles(x, y, width, height, rng):
    """Cut the rectangle recursively into pieces with sides in [TILE_MIN, TILE_MAX]."""
    can_cut = [side >= 2 * TILE_MIN for side in (width, height)]
    must_cut = [side > TILE_MAX for side in (width, height)]
    if not any(must_cut) and (not any(can_cut) or rng.random() < 0.5):
        return [(x, y, width, height)]
    axis = int(np.argmax([width, height])) if any(must_cut) else int(rng.choice(np.flatnonzero(can_cut)))
    side = (width, height)[axis]
    cut = int(rng.integers(TILE_MIN, side - TILE_MIN + 1))
    if axis == 0:
        return _rectangles(x, y, cut, height, rng) + _rectangles(x + cut, y, width - cut, height, rng)
    return _rectangles(x, y, width, cut, rng) + _rectangles(x, y + cut, width, height - cut, rng)


def make_phone_photo(seed, width=4032, height=3024, data=DEFAULT_DATA):
    """One synthetic phone photo (see the module docstring).

    Parameters
    ----------
    seed : int
        Chooses the layout, the tiles and the noise.
    width, height : int
        Size in pixels (both at least 200).
    data : path
        The 15-Scene folder; its ``train/`` images are the tiles.

    Returns
    -------
    ndarray (height, width, 3), uint8, RGB
    """
    if min(width, height) < TILE_MIN:
        raise ValueError(f"width and height must be at least {TILE_MIN}, got {width}x{height}")
    sources = list_images(Path(data) / "train", recursive=True)
    if not sources:
        raise ValueError(f"no images under {Path(data) / 'train'}")
    rng = np.random.default_rng(seed)
    photo = np.empty((height, width, 3), dtype=np.float32)
    for x, y, w, h in _rectangles(0, 0, width, height, rng):
        tile = cv2.imread(str(sources[rng.integers(len(sources))]), cv2.IMREAD_COLOR_RGB)
        scale = max(w / tile.shape[1], h / tile.shape[0])
        size = (max(w, round(tile.shape[1] * scale)), max(h, round(tile.shape[0] * scale)))
        tile = cv2.resize(tile, size, interpolation=cv2.INTER_CUBIC)
        top, left = (size[1] - h) // 2, (size[0] - w) // 2
        photo[y:y + h, x:x + w] = tile[top:top + h, left:left + w]
    photo += rng.standard_normal(photo.shape, dtype=np.float32) * NOISE_SIGMA
    return np.clip(photo + 0.5, 0, 255).astype(np.uint8)


def write_phone_photos(folder, n, seed=0, width=4032, height=3024, quality=92, data=DEFAULT_DATA):
    """Write ``n`` phone photos (seeds ``seed`` to ``seed + n - 1``) as JPEGs.

    A file that already exists is kept, not rewritten (its name holds the seed, the size
    and the quality); a new file appears under its name only once complete.

    Parameters
    ----------
    folder : path
        Created if missing.
    n : int
    seed : int
    width, height : int
    quality : int
        JPEG quality (OpenCV's ``IMWRITE_JPEG_QUALITY``).
    data : path
        The 15-Scene folder (see :func:`make_phone_photo`).

    Returns
    -------
    list of Path
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo_seed in range(seed, seed + n):
        path = folder / f"phone_{width}x{height}_q{quality}_seed{photo_seed}.jpg"
        if not path.exists():
            rgb = make_phone_photo(photo_seed, width, height, data)
            ok, encoded = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            if not ok:
                raise RuntimeError(f"OpenCV could not encode {path.name}")
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(encoded.tobytes())
            os.replace(partial, path)
        paths.append(path)
    return paths
