"""The pixel limit is checked on the size OpenCV will decode, read from the header of every
format OpenCV decodes, before decoding (issue 29, item 5).

The bombs here are never decoded: ``cv2.imdecode`` is replaced by a function that fails if
called, so a test proves the refusal came from the header alone (and fails, rather than
allocating gigabytes, on a reader that lets the file through). The command-line test runs
the real thing in a subprocess and measures its peak memory.
"""

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import vladkit
from vladkit.features.images import ImageReadError, read_image, read_size


def read_header(data):
    # Imported here rather than at the top, so that the tests of read_image also run (and
    # fail on their merits) against a vladkit without this module.
    from vladkit.features.image_header import read_header

    return read_header(data)


def _image(h=61, w=83, channels=3, seed=0):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _encode(ext, image, params=()):
    try:
        ok, buf = cv2.imencode(ext, image, list(params))
    except cv2.error:
        ok = False
    if not ok:
        pytest.skip(f"this OpenCV build does not write {ext}")
    return buf.tobytes()


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any decoding fail loudly: what is refused here must be refused from its header."""
    def refuse(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(cv2, "imread", refuse)


# -- the size read is the size decoded ---------------------------------------------------------

def _bmp(rows, top_down=False, os2=False):
    """A 24-bit BMP: bottom-up (the usual), top-down (negative height) or OS/2 1.x."""
    h, w = rows.shape[:2]
    stride = (w * 3 + 3) & ~3
    order = rows if top_down else rows[::-1]
    pixels = b"".join(r[:, ::-1].tobytes() + b"\0" * (stride - w * 3) for r in order)
    if os2:
        info = struct.pack("<IHHHH", 12, w, h, 1, 24)
    else:
        info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def _gif(width, height):
    """A GIF whose logical screen is width x height, with one 1 x 1 frame in it."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b")


def _animation(ext):
    if not hasattr(cv2, "imencodeanimation"):
        pytest.skip("this OpenCV has no animation API")
    animation = cv2.Animation()
    animation.frames = [_image(), _image(seed=1)]
    animation.durations = [100, 100]
    ok, buf = cv2.imencodeanimation(ext, animation)
    if not ok:
        pytest.skip(f"this OpenCV build does not write animated {ext}")
    return buf.tobytes()


def _exif_jpeg():
    Image = pytest.importorskip("PIL.Image")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the stored size is not the displayed one
    out = io.BytesIO()
    Image.fromarray(_image()).save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def _jpeg_with_decoy_and_garbage():
    """A JPEG with an APP15 segment holding a fake 65535 x 65535 frame header, and stray
    bytes between two segments (libjpeg skips both; so must the reader)."""
    data = _encode(".jpg", _image())
    decoy = b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03" + b"\x01\x11\x00" * 3
    app15 = b"\xff\xef" + struct.pack(">H", len(decoy) + 2) + decoy
    app0_end = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:2] + app15 + data[2:app0_end] + b"stray" + data[app0_end:]


def _codestream():
    jp2 = _encode(".jp2", _image())
    return jp2[jp2.index(b"jp2c") + 4:]  # the raw JPEG 2000 codestream inside the JP2 box


CASES = {
    "bmp": lambda: _encode(".bmp", _image()),
    "bmp top-down": lambda: _bmp(_image(), top_down=True),
    "bmp os/2": lambda: _bmp(_image(), os2=True),
    "gif": lambda: _encode(".gif", _image()),
    "gif animated": lambda: _animation(".gif"),
    "avif": lambda: _encode(".avif", _image()),
    "avif grey": lambda: _encode(".avif", _image(channels=1)),
    "hdr": lambda: _encode(".hdr", _image()),
    "jpeg": lambda: _encode(".jpg", _image()),
    "jpeg progressive": lambda: _encode(".jpg", _image(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    "jpeg exif-rotated": _exif_jpeg,
    "jpeg decoy sof and garbage": _jpeg_with_decoy_and_garbage,
    "webp lossless": lambda: _encode(".webp", _image()),
    "webp lossy": lambda: _encode(".webp", _image(), [cv2.IMWRITE_WEBP_QUALITY, 80]),
    "webp lossy alpha (vp8x)": lambda: _encode(".webp", _image(channels=4), [cv2.IMWRITE_WEBP_QUALITY, 80]),
    "webp animated": lambda: _animation(".webp"),
    "webp bare vp8l": lambda: _encode(".webp", _image())[20:],  # no RIFF: libwebp takes it
    "sun raster": lambda: _encode(".ras", _image()),
    "pbm": lambda: _encode(".pbm", _image(channels=1)),
    "pgm": lambda: _encode(".pgm", _image(channels=1)),
    "ppm": lambda: _encode(".ppm", _image()),
    "pgm comments": lambda: b"P5\n# a comment\n 83 # another\n61\n255\n" + _image(channels=1).tobytes(),
    "pam": lambda: _encode(".pam", _image()),
    "pfm": lambda: _encode(".pfm", _image().astype(np.float32) / 255),
    "tiff": lambda: _encode(".tif", _image()),
    "tiff 16-bit": lambda: _encode(".tif", _image().astype(np.uint16) * 257),
    "tiff two pages": lambda: cv2.imencodemulti(".tif", [_image(), np.zeros((300, 400, 3), np.uint8)])[1].tobytes(),
    "png": lambda: _encode(".png", _image()),
    "png 16-bit alpha": lambda: _encode(".png", _image(channels=4).astype(np.uint16) * 257),
    "png animated": lambda: _animation(".png"),
    "jpeg 2000": lambda: _encode(".jp2", _image()),
    "jpeg 2000 codestream": _codestream,
}


@pytest.mark.parametrize("case", list(CASES))
def test_header_size_is_the_decoded_size(case):
    data = CASES[case]()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # as stored
    assert decoded is not None, f"OpenCV does not decode the {case} fixture"
    header = read_header(data)
    assert (header.height, header.width) == decoded.shape[:2]
    assert read_header(io.BytesIO(data)) == header  # from a file: the same
    assert sorted(read_image(data).shape[:2]) == sorted(decoded.shape[:2])  # not refused


def test_first_page_of_a_tiff_is_the_one_read():
    """OpenCV decodes the first page: a larger second one does not count, and a larger
    first one is not hidden by a smaller second one."""
    small, big = _image(), np.zeros((300, 400, 3), np.uint8)
    assert read_header(cv2.imencodemulti(".tif", [small, big])[1].tobytes())[1:3] == (83, 61)
    assert read_header(cv2.imencodemulti(".tif", [big, small])[1].tobytes())[1:3] == (400, 300)


def test_format_is_found_as_opencv_finds_it(tmp_path):
    """By content, never the name; in OpenCV's order, first match only."""
    png = _encode(".png", _image())
    path = tmp_path / "photo.jpg"
    path.write_bytes(png)
    assert read_header(png).format == "PNG" and read_image(path).shape == (61, 83)
    # A JPEG whose bytes 4-8 read 'ftyp' is claimed by OpenCV's AVIF decoder (registered
    # before JPEG), which fails: the reader must not read it as the JPEG it looks like.
    jpeg = _encode(".jpg", _image())
    polyglot = jpeg[:4] + b"ftypavif" + jpeg[12:]
    assert cv2.imdecode(np.frombuffer(polyglot, np.uint8), cv2.IMREAD_COLOR) is None
    from vladkit.features.image_header import HeaderError

    with pytest.raises(HeaderError) as info:
        read_header(polyglot)
    assert info.value.format == "AVIF"


# -- bombs: refused from the header, never decoded ----------------------------------------------

def _hdr_bomb(width, height):
    """A run-length encoded Radiance HDR of one colour: 12000 x 12000 takes 9 MB and decodes
    to 1.7 GB of float pixels."""
    def channel(value):
        full, rest = divmod(width, 127)
        return bytes([128 + 127, value]) * full + (bytes([128 + rest, value]) if rest else b"")

    line = b"\x02\x02" + width.to_bytes(2, "big") + channel(128) * 4
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode() + line * height


@pytest.fixture(scope="module")
def hdr_bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "photo.jpg"  # named as a photo: the name is not read
    path.write_bytes(_hdr_bomb(12000, 12000))
    return path


def test_hdr_bomb_named_jpg_is_refused_without_decoding(hdr_bomb, no_decoding):
    with pytest.raises(ImageReadError) as info:
        read_image(hdr_bomb)
    assert "12000x12000 = 144,000,000 pixels exceeds the limit of 100,000,000" in info.value.reason
    assert read_size(hdr_bomb) == (12000, 12000, 144_000_000)


def test_small_hdr_is_read(tmp_path):
    path = tmp_path / "small.jpg"
    path.write_bytes(_hdr_bomb(40, 30))
    assert read_image(path).shape == (30, 40)


def _tiled_tiff(width, height, tile_width, tile_length):
    """A TIFF header whose image sits in tiles of another size (the tile data is not valid:
    it is never decoded here)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile_width), (323, 4, tile_length), (324, 4, 200), (325, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
        for tag, typ, value in tags) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 64


def _rle8_bmp(width, height):
    """An RLE8 BMP that ends at once (end of bitmap): a kilobyte, however large it says."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, 2, 0, 0, 0, 0)
    offset = 14 + 40 + 1024
    return b"BM" + struct.pack("<IHHI", offset + 2, 0, 0, offset) + info + bytes(1024) + b"\x00\x01"


def _bare_vp8l(width, height):
    """A VP8L bitstream with no RIFF container, which libwebp (so OpenCV) decodes."""
    bits = (width - 1) | (height - 1) << 14
    return b"\x2f" + bits.to_bytes(4, "little") + b"\0" * 40


BOMBS = {
    # (bytes, what the refusal names)
    "top-down rle8 bmp": (lambda: _rle8_bmp(20000, -20000), "20000x20000 = 400,000,000 pixels"),
    "gif screen past 32767": (lambda: _gif(40000, 20000), "40000x20000 = 800,000,000 pixels"),
    "bare vp8l": (lambda: _bare_vp8l(16384, 16384), "16384x16384 = 268,435,456 pixels"),
    "1 x 1 tiff in huge tiles": (lambda: _tiled_tiff(1, 1, 16384, 16000),
                                 "1x1, but 262,144,000 pixels to decode (its 16384 x 16000 tiles"),
    "pam": (lambda: b"P7\nWIDTH 20000\nHEIGHT 20000\nDEPTH 1\nMAXVAL 255\nENDHDR\n", "20000x20000"),
    "pfm": (lambda: b"PF\n20000 20000\n-1\n", "20000x20000"),
    "sun raster": (lambda: b"\x59\xa6\x6a\x95" + struct.pack(">7i", 20000, 20000, 8, 0, 1, 0, 0), "20000x20000"),
    "jpeg 2000 codestream": (lambda: b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">8I", 30000, 20000, 0, 0, 256, 256, 0, 0)
                             + b"\x00\x01\x07\x01\x01", "30000x20000"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_bombs_are_refused_from_their_header(tmp_path, no_decoding, bomb):
    """Each of these got past the old header reader (imagesize) and was decoded blind: it
    did not know the format, read a signed size as negative, or ignored the tiles."""
    make, size = BOMBS[bomb]
    path = tmp_path / "photo.jpg"
    path.write_bytes(make())
    with pytest.raises(ImageReadError, match="exceeds the limit of 100,000,000") as info:
        read_image(path)
    assert size in info.value.reason


def test_avif_frame_larger_than_its_ispe_counts(no_decoding):
    """libavif decodes the AV1 frame at the size its sequence header gives, whatever the
    ispe box says (a 1200 x 1000 frame under an ispe of 100 x 100 costs 1.2 megapixels)."""
    data = bytearray(_encode(".avif", np.full((1000, 1200, 3), 90, np.uint8), [cv2.IMWRITE_AVIF_SPEED, 10]))
    at = data.index(b"ispe")
    struct.pack_into(">II", data, at + 8, 100, 100)
    header = read_header(bytes(data))
    assert (header.width, header.height) == (100, 100) and header.pixels == 1_200_000
    with pytest.raises(ImageReadError, match=r"100x100, but 1,200,000 pixels to decode"):
        read_image(bytes(data), max_pixels=500_000)


def _png_chunk_bomb():
    """60 bytes of PNG whose second chunk claims 4 GB: OpenCV allocates that much before
    finding the file too short."""
    def chunk(kind, payload, length=None):
        return (struct.pack(">I", len(payload) if length is None else length) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"tEXt", b"a\0b", length=0xFFFFFF00) + chunk(b"IEND", b""))


def test_png_chunk_past_the_end_is_refused_whatever_the_limit(no_decoding):
    from vladkit.features.image_header import CorruptImageError

    with pytest.raises(CorruptImageError):
        read_header(_png_chunk_bomb())
    for max_pixels in (100_000_000, None):
        with pytest.raises(ImageReadError, match="truncated or corrupt PNG: its 'tEXt' chunk"):
            read_image(_png_chunk_bomb(), max_pixels=max_pixels)


# -- no size, no decoding (unless the limit is lifted) ------------------------------------------

def test_unknown_format_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"not an image, whatever its name says\n" * 20)
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *args: calls.append(1) or real(*args))
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.reason.startswith("not a recognised image format: the header gives no size")
    assert calls == []
    assert read_size(path) is None
    # With the limit lifted, OpenCV may try it (and here fails).
    with pytest.raises(ImageReadError, match="could not be decoded"):
        read_image(path, max_pixels=None)
    assert calls == [1]


def test_known_format_without_a_size_is_refused_unless_the_limit_is_lifted(no_decoding):
    exr = b"\x76\x2f\x31\x01\x02\x00\x00\x00" + b"\0" * 64
    with pytest.raises(ImageReadError) as info:
        read_image(exr)
    assert "the header gives no size (OpenEXR headers are not read)" in info.value.reason
    assert "max_pixels=None" in info.value.reason and "--max-pixels 0" in info.value.reason
    # A Radiance header in an orientation OpenCV does not read; a PAM cut short.
    for data in (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n+Y 10 +X 10\n" + b"\0" * 400,
                 b"P7\nWIDTH 10\nHEIGHT"):
        with pytest.raises(ImageReadError, match="the header gives no size"):
            read_image(data)


def test_lifted_limit_decodes_what_the_header_reader_cannot_size():
    jpeg = _encode(".jpg", _image())
    cut = jpeg[:jpeg.index(b"\xff\xc0")]  # ends before its frame header
    with pytest.raises(ImageReadError, match="the header gives no size"):
        read_image(cut)
    with pytest.raises(ImageReadError, match="could not be decoded"):
        read_image(cut, max_pixels=None)


# -- through the command line: measured, not assumed -----------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kilobytes on Linux only")
def test_cli_skips_the_hdr_bomb_without_allocating_it(tmp_path, hdr_bomb):
    """`vladkit vocab build` on three photos and the 12000 x 12000 HDR bomb named photo.jpg,
    with --max-memory 1GB: the bomb is skipped, and the peak memory of the process stays far
    below its decoded size (1.7 GB of float pixels; the old reader decoded it: 2.4 GB)."""
    from conftest import textured_image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.jpg"), textured_image(i, (96, 112)))
    shutil.copyfile(hdr_bomb, folder / "photo.jpg")
    log, peak = tmp_path / "log.txt", tmp_path / "peak.txt"
    env = {**os.environ, "PYTHONPATH": str(Path(vladkit.__file__).parents[1])}  # this vladkit
    # The command's own peak, as VmHWM (its address space's high-water mark) at exit: the
    # rusage of a child also counts the RSS of the process it was forked from (Linux keeps
    # the pre-exec high-water mark), which after a long test session is over 1 GB.
    command = ("import atexit, sys\n"
               "from vladkit.app.cli import main\n"
               "def record():\n"
               "    with open('/proc/self/status') as status, open(sys.argv[1], 'w') as out:\n"
               "        out.write(next(line for line in status if line.startswith('VmHWM:')))\n"
               "atexit.register(record)\n"
               "sys.exit(main(sys.argv[2:]))\n")
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-c", command, str(peak), "vocab", "build", str(folder), "-k", "2", "-q",
             "--max-memory", "1GB", "-o", str(tmp_path / "words.npz")],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    output = log.read_text()
    assert done.returncode == 0, output
    assert "skipped" in output and "photo.jpg: 12000x12000 = 144,000,000 pixels exceeds" in output
    assert "of 3 images (1 skipped)" in output
    peak_mb = int(peak.read_text().split()[1]) / 1024  # "VmHWM:  123456 kB"
    assert peak_mb < 700, f"peak RSS {peak_mb:.0f} MB"
