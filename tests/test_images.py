import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from vladkit.features.images import ImageReadError, list_images, read_image


def _gradient(h=60, w=80):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 3 + yy * 2) % 256).astype(np.uint8)


def _write(path, ext, image, params=()):
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def test_16bit_png_keeps_the_high_byte(tmp_path):
    grey = _gradient()
    path = _write(tmp_path / "deep.png", ".png", grey.astype(np.uint16) * 257)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # the fixture is 16-bit
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == grey.shape
    np.testing.assert_array_equal(out, grey)


def test_rgba_png_uses_colour_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    bgra = np.concatenate([rgb[:, :, ::-1], alpha], axis=2)
    path = _write(tmp_path / "alpha.png", ".png", bgra)
    np.testing.assert_array_equal(read_image(path, mode="rgb"), rgb)
    # libpng's grey conversion rounds differently from OpenCV's by at most one level.
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(int)
    assert np.abs(read_image(path).astype(int) - grey).max() <= 1


def test_grey_jpeg(tmp_path):
    grey = _gradient()
    path = _write(tmp_path / "grey.jpg", ".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 98])
    out = read_image(path)
    assert out.shape == grey.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - grey).mean() < 3
    rgb = read_image(path, mode="rgb")
    assert rgb.shape == grey.shape + (3,)
    np.testing.assert_array_equal(rgb[:, :, 0], rgb[:, :, 1])


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_formats_round_trip(tmp_path, ext):
    grey = _gradient()
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    path = _write(tmp_path / f"image{ext}", ext, grey, params)
    np.testing.assert_array_equal(read_image(path), grey)


def test_non_ascii_file_name(tmp_path):
    grey = _gradient()
    path = _write(tmp_path / "фото 写真 é.png", ".png", grey)
    np.testing.assert_array_equal(read_image(path), grey)
    np.testing.assert_array_equal(read_image(str(path)), grey)


def test_bytes_input(tmp_path):
    grey = _gradient()
    ok, buf = cv2.imencode(".png", grey)
    np.testing.assert_array_equal(read_image(buf.tobytes()), grey)


def _exif_jpeg(array, orientation):
    Image = pytest.importorskip("PIL.Image")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=98, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    stored = np.full((40, 80), 30, np.uint8)
    stored[:8, :] = 230  # a bright band along the stored top edge
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_exif_jpeg(stored, orientation=6))  # 6: rotate 90 degrees clockwise
    out = read_image(path)
    assert out.shape == (80, 40)
    upright = np.rot90(stored, k=-1)  # clockwise: the top band becomes the right edge
    assert np.abs(out.astype(int) - upright).mean() < 4
    assert out[:, -6:].mean() > 200 and out[:, :30].mean() < 60


def test_exif_orientation_with_reduced_jpeg_decode(tmp_path):
    stored = np.full((400, 800), 30, np.uint8)
    stored[:80, :] = 230
    path = tmp_path / "rotated_big.jpg"
    path.write_bytes(_exif_jpeg(stored, orientation=6))
    out = read_image(path, max_side=100)  # decodes at 1/4 size, then resizes
    assert out.shape == (100, 50)
    assert out[:, -8:].mean() > 200 and out[:, :30].mean() < 60


def _colour(h, w):
    """RGB with three different planes (a horizontal ramp, a vertical ramp, a constant):
    any swap of channels shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 40)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_rgb_without_imread_color_rgb(tmp_path, monkeypatch, ext):
    """OpenCV 4.8 to 4.10 (admitted until issue 12, finding 4) have no IMREAD_COLOR_RGB:
    mode="rgb" ended in an AttributeError there. Reading must not depend on the flag."""
    rgb = _colour(48, 64)
    path = _write(tmp_path / f"colour{ext}", ext, np.ascontiguousarray(rgb[:, :, ::-1]))
    decoded = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]  # what the file holds, as RGB
    if ext == ".png":
        np.testing.assert_array_equal(decoded, rgb)
    monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    np.testing.assert_array_equal(read_image(path, mode="rgb"), decoded)
    np.testing.assert_array_equal(read_image(path.read_bytes(), mode="rgb"), decoded)


def test_rgb_with_reduced_jpeg_decode(tmp_path):
    """A JPEG decoded at a reduced size (max_side) came out in OpenCV's BGR order."""
    path = _write(tmp_path / "big.jpg", ".jpg", np.ascontiguousarray(_colour(320, 400)[:, :, ::-1]),
                  [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = read_image(path, mode="rgb")
    assert full[:, :, 2].mean() == pytest.approx(40, abs=2)  # blue: the constant plane
    out = read_image(path, mode="rgb", max_side=100)  # decoded at 1/4 size
    assert out.shape == (80, 100, 3)
    expected = cv2.resize(full, (100, 80), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - expected).mean() < 2


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_jpeg_is_refused(tmp_path, make_textured, fraction):
    ok, buf = cv2.imencode(".jpg", make_textured(1, (300, 400)))
    data = buf.tobytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in info.value.reason


def test_truncated_png_is_refused(tmp_path, make_textured):
    ok, buf = cv2.imencode(".png", make_textured(1, (300, 400)))
    path = tmp_path / "truncated.png"
    path.write_bytes(buf.tobytes()[:-2000])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_text_file_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageReadError, match="not a recognised image format") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageReadError, match="No such file") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_pixel_limit_names_limit_and_remedy(tmp_path):
    path = _write(tmp_path / "big.png", ".png", _gradient(100, 100))
    with pytest.raises(ImageReadError) as info:
        read_image(path, max_pixels=5_000)
    message = str(info.value)
    assert "10,000 pixels exceeds the limit of 5,000" in message
    assert "max_pixels=" in message and "--max-pixels" in message
    assert read_image(path, max_pixels=10_000).shape == (100, 100)
    assert read_image(path, max_pixels=None).shape == (100, 100)


def _png_claiming_size(width, height):
    """A PNG whose header claims width x height: a decompression bomb's signature."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
            ">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming_size(50_000, 50_000))
    with pytest.raises(ImageReadError) as info:
        read_image(path)  # default limit: 100 megapixels
    assert "2,500,000,000 pixels exceeds the limit of 100,000,000" in str(info.value)


def test_max_side_downscales_keeping_aspect(china_path):
    full = read_image(china_path)
    assert full.shape == (427, 640)
    small = read_image(china_path, max_side=320)  # JPEG decoded at half size
    assert small.shape == (214, 320)
    # Decoding at half size averages 2 x 2 blocks of the full decode.
    blocks = full[:426].astype(float).reshape(213, 2, 320, 2).mean(axis=(1, 3))
    assert np.abs(small[:213] - blocks).mean() < 1
    smaller = read_image(china_path, max_side=300)  # half-size decode, then area resize
    assert smaller.shape == (200, 300)
    reference = cv2.resize(full, (300, 200), interpolation=cv2.INTER_AREA)
    assert np.abs(smaller.astype(int) - reference).mean() < 8
    assert read_image(china_path, max_side=1000).shape == (427, 640)


def test_arrays():
    grey = _gradient()
    np.testing.assert_array_equal(read_image(grey), grey)
    np.testing.assert_array_equal(read_image(grey.astype(np.uint16) * 257), grey)
    np.testing.assert_array_equal(read_image(grey / 255.0), grey)
    rgba = np.dstack([grey, grey, grey, np.zeros_like(grey)])
    np.testing.assert_array_equal(read_image(rgba), grey)
    with pytest.raises(TypeError, match="dtype"):
        read_image(grey.astype(np.int32))
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageReadError, match="NaN"):
        read_image(np.full((4, 4), np.nan))


def test_bad_arguments():
    with pytest.raises(TypeError, match="path, bytes or a numpy array"):
        read_image(42)
    with pytest.raises(ValueError, match="mode"):
        read_image(_gradient(), mode="bgr")
    with pytest.raises(ValueError, match="max_side"):
        read_image(_gradient(), max_side=0)


def test_list_images_sorted_filtered_recursive(tmp_path):
    for name in ["b.JPG", "a.png", "c.txt", ".hidden.jpg", "._b.jpg", "sub/z.webp", "sub/a.TIFF",
                 ".git/x.png", "sub/deeper/y.jpeg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]
    assert names(list_images(tmp_path)) == ["a.png", "b.JPG"]
    assert names(list_images(tmp_path, recursive=True)) == [
        "a.png", "b.JPG", "sub/a.TIFF", "sub/deeper/y.jpeg", "sub/z.webp"]
    assert names(list_images(tmp_path, extensions=["png"], include_hidden=True, recursive=True)) == [
        ".git/x.png", "a.png"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "a.png")


def test_list_images_survives_symlink_loop(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "img.png").write_bytes(b"x")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["img.png"]
