"""The near-duplicate benchmark the demo builds from the photos that ship with installed
packages (nothing is downloaded): the photos, the Copydays-style attacks, and attacked
copies of an image (the positives of NetVLAD training when there are no labels)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..features.images import ImageReadError, read_image

__all__ = [
    "ATTACKS",
    "NearDuplicateSet",
    "attacked_copies",
    "copy_groups",
    "demo_photos",
    "near_duplicate_set",
]


# ------------------------------------------------------------------ the demo's photos

# scikit-image's sample photos that ship inside its wheel (its other samples are fetched
# from the network on first use, which the demo must not do). Synthetic drawings
# (chessboard, phantom, horse silhouette) and the right view of the stereo pair (a near
# duplicate of motorcycle_left) are left out.
_SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
    "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
    "ihc.png", "logo.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)


def _package_folder(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _photo_files():
    """(name, path) of every sample photo found in the installed packages."""
    found = []
    sklearn_images = _package_folder("sklearn", "datasets", "images")
    for name in ("china.jpg", "flower.jpg"):
        if sklearn_images is not None and (sklearn_images / name).is_file():
            found.append((f"sklearn/{name}", sklearn_images / name))
    matplotlib_data = _package_folder("matplotlib", "mpl-data", "sample_data")
    if matplotlib_data is not None and (matplotlib_data / "grace_hopper.jpg").is_file():
        found.append(("matplotlib/grace_hopper.jpg", matplotlib_data / "grace_hopper.jpg"))
    skimage_data = _package_folder("skimage", "data")
    if skimage_data is not None:
        found += [(f"skimage/{name}", skimage_data / name)
                  for name in _SKIMAGE_PHOTOS if (skimage_data / name).is_file()]
    return found


def _decode(path):
    """The file's pixels. Through Pillow where it is installed (it is a scikit-image
    dependency): libpng, under OpenCV, prints a warning to stderr about one of
    scikit-image's PNGs (page.png's colour profile), which the demo's user cannot act on."""
    if path.suffix.lower() != ".png":
        return path  # lossless PNG only: a JPEG decoder's pixels may differ by a level
    try:
        from PIL import Image
    except ImportError:
        return path
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def demo_photos(max_side=512, min_photos=12):
    """The sample photos of scikit-learn, scikit-image and matplotlib, as RGB arrays.

    Parameters
    ----------
    max_side : int
        Larger photos are downscaled to this long side.
    min_photos : int
        Fewer photos found raises an error that says what to install.

    Returns
    -------
    list of (name, ndarray (h, w, 3) uint8), sorted by name
    """
    photos = []
    for name, path in _photo_files():
        try:
            photos.append((name, read_image(_decode(path), mode="rgb", max_side=max_side)))
        except (ImageReadError, OSError):
            continue  # a damaged installation file: use the others
    if len(photos) < min_photos:
        raise RuntimeError(
            f"found {len(photos)} sample photos in the installed packages, the demo needs "
            f"{min_photos}: install the demo extra (pip install 'vladkit[demo]', which adds "
            "scikit-image and matplotlib)"
        )
    return sorted(photos, key=lambda item: item[0])


# ---------------------------------------------------------------- image transformations


def _jpeg(image, quality):
    _, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()


def _crop(image, fraction, rng):
    """A window of ``fraction`` of the area, same aspect ratio, at a random place."""
    h, w = image.shape[:2]
    ch, cw = max(16, round(h * fraction ** 0.5)), max(16, round(w * fraction ** 0.5))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return image[y:y + ch, x:x + cw].copy()


def _scale(image, factor):
    h, w = image.shape[:2]
    size = (max(16, round(w * factor)), max(16, round(h * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interpolation)


def _rotate(image, degrees):
    """Rotate about the centre and keep the largest upright window without borders."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    rotated = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    angle = np.radians(abs(degrees))
    # Largest axis-aligned rectangle inside the rotated frame (same aspect ratio).
    shrink = 1.0 / (np.cos(angle) + np.sin(angle) * max(h, w) / min(h, w))
    ch, cw = int(h * shrink), int(w * shrink)
    y, x = (h - ch) // 2, (w - cw) // 2
    return rotated[y:y + ch, x:x + cw].copy()


def _blur(image, sigma):
    return cv2.GaussianBlur(image, (0, 0), sigma)


def _contrast(image, gamma, gain):
    values = (image.astype(np.float32) / 255.0) ** gamma
    values = 0.5 + gain * (values - 0.5)
    return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _strong(image, rng):
    image = _crop(image, 0.6, rng)
    image = _rotate(image, float(rng.choice([-1, 1])) * 8.0)
    image = _scale(image, 0.6)
    image = _contrast(image, 1.3, 0.8)
    image = _blur(image, 1.2)
    return _jpeg(image, 20)


#: Copydays-style attacks (Douze et al., "Evaluation of GIST descriptors for web-scale
#: image search", CIVR 2009): name -> f(rgb image, numpy Generator) -> rgb image.
ATTACKS = {
    "crop 40%": lambda image, rng: _crop(image, 0.4, rng),
    "jpeg q=8": lambda image, rng: _jpeg(image, 8),
    "rotate 12°": lambda image, rng: _rotate(image, float(rng.choice([-1, 1])) * 12.0),
    "scale 0.35": lambda image, rng: _scale(image, 0.35),
    "blur σ=2.5": lambda image, rng: _blur(image, 2.5),
    "contrast": lambda image, rng: _contrast(image, 0.45, 0.55),
    "strong": _strong,
}


@dataclass
class NearDuplicateSet:
    """A near-duplicate retrieval benchmark (INRIA Copydays style).

    Attributes
    ----------
    database : list of (id, rgb image)
        The originals and the distractors.
    queries : list of (id, rgb image, attack name)
    ground_truth : dict
        query id -> [id of its original]
    learning : list of grey images
        For vocabularies, PCA and quantizers: never a query, never a database image.
    """

    database: list = field(default_factory=list)
    queries: list = field(default_factory=list)
    ground_truth: dict = field(default_factory=dict)
    learning: list = field(default_factory=list)


def near_duplicate_set(photos, *, distractors_per_photo=3, learning_per_photo=16, seed=0):
    """Build originals, attacked queries, distractors and a learning set from photos.

    Each photo is an original in the database and gives one query per attack in
    :data:`ATTACKS`. Distractors are mirrored crops (60-90% of the area) of the photos:
    SIFT is not mirror-invariant, so they share the photos' statistics but not their
    descriptors, which makes them hard negatives. The learning set (vocabularies, PCA,
    product quantizers) is made of grey crops (20-60% of the area, rescaled by 0.5-1.0) of
    the photos turned upside down -- for rotation-invariant SIFT, a mirror image -- so
    nothing learnt has seen a query or a database image as such.

    Returns
    -------
    NearDuplicateSet
    """
    rng = np.random.default_rng(seed)
    data = NearDuplicateSet()
    for name, photo in photos:
        original = f"{name}"
        data.database.append((original, photo))
        for attack, transform in ATTACKS.items():
            query = f"{name} [{attack}]"
            data.queries.append((query, transform(photo, rng), attack))
            data.ground_truth[query] = [original]
        mirrored = photo[:, ::-1]
        for i in range(distractors_per_photo):
            crop = _crop(mirrored, rng.uniform(0.6, 0.9), rng)
            data.database.append((f"{name} [distractor {i + 1}]", crop))
        flipped = cv2.cvtColor(np.ascontiguousarray(photo[::-1]), cv2.COLOR_RGB2GRAY)
        for _ in range(learning_per_photo):
            crop = _crop(flipped, rng.uniform(0.2, 0.6), rng)
            data.learning.append(_scale(crop, rng.uniform(0.5, 1.0)))
    return data


# ----------------------------------------------------------------- unlabelled groups


def attacked_copies(image, n_copies=4, *, seed=0, index=0, attacks=None):
    """Attacked copies of one image: its positives when there are no labels.

    The attacks are those of the demo's near-duplicate benchmark
    (:data:`vladkit.datasets.ATTACKS`: a 40% crop, JPEG at quality 8, a 12° rotation,
    scaling by 0.35, a Gaussian blur, a contrast change and a strong combination), each
    copy a different attack, chosen at random without replacement (every attack once
    when ``n_copies`` is their number; more copies start another round).

    Parameters
    ----------
    image : ndarray (h, w, 3) uint8 (RGB) or (h, w)
    n_copies : int, default=4
    seed, index : int
        The copies are drawn from ``numpy.random.default_rng([seed, 3, index])``: the same
        for the same image number whatever the order in which images are processed.
    attacks : dict name -> f(image, rng) -> image, optional
        Default :data:`vladkit.datasets.ATTACKS`.

    Returns
    -------
    list of (attack name, image)
    """
    attacks = dict(ATTACKS if attacks is None else attacks)
    if not attacks:
        raise ValueError("attacks is empty: no way to make copies")
    n_copies = _positive_int("n_copies", n_copies)
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (h, w, 3) or (h, w) uint8 array, got {image.dtype} "
                         f"of shape {image.shape}")
    rng = np.random.default_rng([int(seed), 3, int(index)])
    names = list(attacks)
    chosen = []
    while len(chosen) < n_copies:
        chosen += [names[i] for i in rng.permutation(len(names))]
    return [(name, attacks[name](image, rng)) for name in chosen[:n_copies]]


def copy_groups(n_images, n_copies):
    """The groups of ``n_images`` originals each followed by its ``n_copies`` copies
    (the order :func:`attacked_copies` sets are usually listed in): ``[0] * (n_copies + 1)
    + [1] * (n_copies + 1) + ...``."""
    return np.repeat(np.arange(int(n_images)), int(n_copies) + 1)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
