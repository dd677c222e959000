"""Reading images from paths, bytes or arrays, and listing image folders.

Every extractor reads through :func:`read_image`, so the rules are the same everywhere:

* decoding is OpenCV's (JPEG, PNG 8/16-bit with or without alpha, BMP, TIFF, WebP, ...);
  the EXIF orientation of a JPEG is applied, so a photo taken sideways comes out upright;
* the pixel count is read from the file header *before* decoding, and an image larger than
  ``max_pixels`` (default 100 megapixels) is refused, so a decompression bomb never gets
  allocated. The header is read as OpenCV will decode the file (the format from its first
  bytes, in OpenCV's order, never from its name; see :mod:`vladkit.features.image_header`), and a
  file whose size cannot be read first (an unknown format, OpenEXR, an AVIF sequence, a
  header cut short) is refused too, unless the limit is lifted with ``max_pixels=None``;
* an optional ``max_side`` downscales large photos (with area interpolation; JPEGs are
  decoded directly at a reduced size where that is exact);
* any failure raises :class:`ImageReadError`, which carries the path and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

import cv2
import numpy as np

from .image_header import CorruptImageError, HeaderError, read_header

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "ImageSource",
    "list_images",
    "read_image",
    "read_size",
]

#: Default refusal threshold, in pixels (width x height), checked before decoding
#: (defined in ``_defaults``, which the command line's parser reads).
from .._util.defaults import DEFAULT_MAX_PIXELS  # noqa: E402

#: File name endings :func:`list_images` treats as images (compared case-insensitively).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".pbm", ".pgm", ".ppm", ".pnm", ".gif",  # GIF: OpenCV >= 4.11 reads the first frame
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

_MODES = ("gray", "rgb")
# Colour is decoded in OpenCV's BGR order and converted (see _decode), at full and at
# reduced size alike: the reduced-size flags have no RGB counterpart, and the result does
# not depend on IMREAD_COLOR_RGB, which OpenCV only has from 4.11.
_FLAGS = {"gray": cv2.IMREAD_GRAYSCALE, "rgb": cv2.IMREAD_COLOR}
# Where OpenCV can decode a JPEG at 1/2, 1/4 or 1/8 of its size (exact DCT scaling,
# much faster than a full decode followed by a resize).
_REDUCED_FLAGS = {
    "gray": {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
             8: cv2.IMREAD_REDUCED_GRAYSCALE_8},
    "rgb": {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8},
}


class ImageReadError(ValueError):
    """An image could not be read.

    Attributes
    ----------
    path : str
        The file's path, or ``"<bytes>"`` / ``"<array>"`` for in-memory input.
    reason : str
        What went wrong, in words.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (process pools)
        return (type(self), (self.path, self.reason))


def read_image(
    source: ImageSource,
    *,
    mode: str = "gray",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> np.ndarray:
    """Read one image as an 8-bit array.

    Parameters
    ----------
    source : str, path-like, bytes or ndarray
        A file path (any Unicode name), the encoded bytes of an image file, or a decoded
        array. Arrays are ``(h, w)`` grey or ``(h, w, 3|4)`` RGB(A) in uint8, uint16
        (scaled by 1/257) or float in [0, 1].
    mode : {"gray", "rgb"}
        ``"gray"`` gives ``(h, w)`` uint8 (ITU-R BT.601 luma, as OpenCV converts);
        ``"rgb"`` gives ``(h, w, 3)`` uint8 in RGB order. An alpha channel is dropped:
        the colour channels are used as stored. 16-bit files keep their 8 high bits.
    max_pixels : int or None
        Refuse images with more than this many pixels, read from the header before any
        decoding, and images whose header gives no size. ``None`` lifts the limit and lets
        OpenCV try any file (its own limit of 2**30 pixels remains).
    max_side : int or None
        If the longer side exceeds this, downscale (aspect ratio kept, area interpolation)
        so that it equals ``max_side``.

    Returns
    -------
    ndarray of uint8

    Raises
    ------
    ImageReadError
        The file is missing, empty, not an image, truncated or corrupt, too large, or its
        header gives no size (with a pixel limit).
    TypeError, ValueError
        An argument is of the wrong type or value.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if max_pixels is not None and (not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    if max_side is not None and (not isinstance(max_side, (int, np.integer)) or max_side < 1):
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")

    if isinstance(source, np.ndarray):
        image = _from_array(source, mode)
        _check_pixels("<array>", image.shape[1], image.shape[0], max_pixels)
        full_size = image.shape[1], image.shape[0]
    else:
        name, data = _load_bytes(source)
        image, full_size = _decode(name, data, mode, max_pixels, max_side)
    return _downscale(image, max_side, full_size)


def read_size(source: ImageSource, *, max_side: int | None = None):
    """The shape :func:`read_image` will give, from the file header, without decoding.

    Used to plan work by memory before any image is read: a 12-megapixel JPEG costs a
    few hundred bytes of header reading here, not 36 MB of decoded pixels.

    Parameters
    ----------
    source : str, path-like, bytes or ndarray
    max_side : int or None
        As for :func:`read_image`.

    Returns
    -------
    (height, width, decoded_pixels) or None
        The shape after ``max_side`` (before the EXIF orientation, which swaps the two),
        and how many pixels the decoder produces before downscaling (fewer than the full
        image for a JPEG decoded at a reduced size). None when the header gives no size (a
        missing, truncated or corrupt file, a format whose size is not read):
        :func:`read_image` will say why, or find the size itself with no pixel limit.
    """
    if isinstance(source, np.ndarray):
        if source.ndim < 2:
            return None
        height, width = source.shape[:2]
        image_format = None
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                header = read_header(source)
            else:
                # Only the bytes the header lies in are read, not the whole file.
                with open(os.fspath(source), "rb") as handle:
                    header = read_header(handle)
        except (OSError, ValueError, TypeError):  # HeaderError is a ValueError
            return None
        image_format, width, height = header.format, header.width, header.height
    factor = _jpeg_reduction(image_format, width, height, max_side)
    decoded = -(-width // factor) * -(-height // factor)
    long_side = max(width, height)
    if max_side is not None and long_side > max_side:
        scale = max_side / long_side
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return height, width, decoded


def _load_bytes(source) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>", bytes(source)
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            # Read in Python rather than cv2.imread: Unicode paths work on every OS, and
            # a missing or unreadable file gets the operating system's own reason.
            with open(name, "rb") as f:
                return name, f.read()
        except OSError as exc:
            raise ImageReadError(name, exc.strerror or str(exc)) from exc
    raise TypeError(
        "an image must be a path, bytes or a numpy array, got " f"{type(source).__name__}"
    )


def _check_pixels(name, width, height, max_pixels, pixels=None, note=""):
    """Refuse past max_pixels: ``pixels`` (default width x height) is what the decoder
    allocates, more than the image where ``note`` says why (TIFF tiles, AVIF frames)."""
    pixels = width * height if pixels is None else pixels
    if max_pixels is not None and pixels > max_pixels:
        size = (f"{width}x{height} = {pixels:,} pixels" if pixels == width * height else
                f"{width}x{height}, but {pixels:,} pixels to decode ({note}),")
        raise ImageReadError(
            name,
            f"{size} exceeds the limit of "
            f"{max_pixels:,} pixels (a guard against decompression bombs); raise it with "
            "max_pixels=... (or --max-pixels on the command line), or pass None to lift it",
        )


def _no_size(error):
    """The reason given for a file refused because its header gives no size."""
    if error.format is None:
        return ("not a recognised image format: the header gives no size, so the pixel limit "
                "cannot be checked before decoding")
    return (f"the header gives no size ({error.reason}), so the pixel limit cannot be checked "
            "before decoding; pass max_pixels=None (--max-pixels 0 on the command line) to "
            "decode it anyway")


def _decode(name, data, mode, max_pixels, max_side):
    if not data:
        raise ImageReadError(name, "the file is empty (0 bytes)")
    try:
        header = read_header(data)
    except CorruptImageError as error:
        # OpenCV would fail on it too, after allocating what the file claims.
        raise ImageReadError(name, f"could not be decoded ({error.reason})") from None
    except HeaderError as error:
        if max_pixels is not None:
            raise ImageReadError(name, _no_size(error)) from None
        header, known = None, error.format is not None  # the limit is lifted: OpenCV tries it
    else:
        known = True
    if header is not None:
        _check_pixels(name, header.width, header.height, max_pixels, header.pixels, header.note)
    buf = np.frombuffer(data, dtype=np.uint8)
    factor = 1 if header is None else _jpeg_reduction(header.format, header.width, header.height, max_side)
    flags = _REDUCED_FLAGS[mode][factor] if factor > 1 else _FLAGS[mode]
    try:
        image = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # e.g. OpenCV's own size limit
        raise ImageReadError(name, f"OpenCV could not decode it: {exc.err}") from exc
    if image is None or image.size == 0:
        kind = "a truncated or corrupt image" if known else "not a recognised image format"
        raise ImageReadError(name, f"could not be decoded ({kind})")
    # The full-size (width, height) as decoded, which an EXIF orientation may have swapped
    # relative to the header: from the image itself, or for a reduced JPEG decode, from the
    # header's size in the orientation the reduced image shows.
    width, height = image.shape[1], image.shape[0]
    if factor > 1:
        stored = header.width, header.height
        if (width, height) == (-(-stored[0] // factor), -(-stored[1] // factor)):
            width, height = stored
        else:
            width, height = stored[1], stored[0]
    if mode == "rgb":
        # The same pixels as IMREAD_COLOR_RGB gives where it exists (checked on JPEG,
        # CMYK JPEG, PNG 8/16-bit, grey, palette and RGBA, BMP, TIFF, WebP, PPM, GIF).
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image, (width, height)


def _jpeg_reduction(image_format, width, height, max_side):
    """The largest JPEG DCT scaling factor that still leaves the long side >= max_side."""
    if max_side is None or image_format != "JPEG":
        return 1
    long_side = max(width, height)
    for factor in (8, 4, 2):
        if long_side // factor >= max_side:
            return factor
    return 1


def _from_array(array, mode):
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageReadError(
            "<array>", f"expected shape (h, w) or (h, w, 1|3|4), got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError("<array>", f"the array is empty, shape {array.shape}")
    if array.dtype == np.uint8:
        image = array
    elif array.dtype == np.uint16:
        image = np.round(array / 257.0).astype(np.uint8)
    elif array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ImageReadError("<array>", "float image contains NaN or inf")
        image = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype == bool:
        image = array.astype(np.uint8) * 255
    else:
        raise TypeError(
            f"image arrays must be uint8, uint16, float or bool, got dtype {array.dtype}"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        image = image[:, :, :3]  # drop alpha, as for files
        if mode == "gray":
            return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(image)
    if mode == "rgb":
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image)


def _downscale(image, max_side, full_size):
    """Resize so the long side is max_side; the target comes from the full-size (w, h),
    so a JPEG decoded at a reduced size gets exactly the same shape as a full decode."""
    width, height = full_size
    long_side = max(width, height)
    if max_side is None or long_side <= max_side:
        return image
    scale = max_side / long_side
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (image.shape[1], image.shape[0]):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def list_images(
    folder: str | os.PathLike,
    *,
    recursive: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    include_hidden: bool = False,
) -> list[Path]:
    """List the image files in a folder, in a deterministic order.

    Parameters
    ----------
    folder : str or path-like
    recursive : bool
        Descend into sub-folders (symbolic links to folders are not followed, so a link
        loop cannot make the walk endless).
    extensions : iterable of str
        File endings to keep, compared case-insensitively (``".jpg"`` also keeps ``.JPG``).
    include_hidden : bool
        Keep names starting with a dot (macOS ``._photo.jpg`` resource forks are the usual
        reason to leave this off).

    Returns
    -------
    list of Path
        Sorted by their path relative to ``folder``, compared component by component as
        Unicode strings, so the order is the same on every machine.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {str(root)!r}")
    wanted = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

    def keep(name):
        return (include_hidden or not name.startswith(".")) and name.lower().endswith(wanted)

    found = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if not include_hidden:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(Path(dirpath, f) for f in filenames if keep(f))
    else:
        found = [p for p in root.iterdir() if keep(p.name) and not p.is_dir()]
    return sorted(found, key=lambda p: p.relative_to(root).parts)
