"""Image size from the file header, before any decoding, for every format OpenCV decodes.

:func:`read_image` refuses an image over its pixel limit before decoding it; that is only a
guard if the size it checks is the size the decoder will allocate. So this module reads it
the way OpenCV itself will decode the file:

* **The format** is found from the first bytes, never the file name, by the decoders'
  signature checks in OpenCV's registration order (``loadsave.cpp``): BMP, GIF, AVIF,
  Radiance HDR, JPEG, WebP, Sun raster, PBM/PGM/PPM, PAM, PFM, TIFF, PNG, JPEG 2000 (JP2
  box, then raw codestream), OpenEXR. OpenCV takes the first match and tries no other, so
  a file that is one format to a naive reader and another to OpenCV (a polyglot) is read
  as OpenCV will read it.
* **The size** is read as that decoder's library reads it: the first SOF marker of a JPEG
  (libjpeg's marker walk, garbage between segments included), the first IFD of a TIFF
  (first tag occurrence, libtiff's types), IHDR of a PNG, the canvas of a WebP (libwebp's
  ``WebPGetFeatures`` on the first 32 bytes, as OpenCV calls it), the logical screen of a
  GIF, the SIZ marker of a JPEG 2000 codestream, the ``-Y H +X W`` line of a Radiance
  header (read 127 bytes a line, as ``fgets`` does), the numbers of a PNM/PAM/PFM header
  (each decoder's own tokeniser), and so on.
* **What the decoder allocates** counts, not only ``width x height``: a TIFF's tiles are
  allocated whole (a 1 x 1 TIFF in 16384 x 16000 tiles costs 1 GB), and an AVIF's AV1
  frames are as large as their sequence headers allow, whatever its ``ispe`` box says.

Anything else raises :class:`HeaderError`: an unknown format, a known one whose size cannot
be read (OpenEXR, an AVIF image sequence, a header cut short), so that the caller can refuse
rather than decode blind. :class:`CorruptImageError` marks a file that is certainly
truncated or corrupt *and* would make OpenCV allocate memory before finding out (a PNG
chunk claiming 4 GB past the end of a 60-byte file).

One module over 600 lines on purpose: it is one concept (the size OpenCV will allocate,
for each format OpenCV decodes), its format readers are each 10-60 lines sharing the same
byte readers (``_Source``, ``_Bytes``) and the dispatch table ``_FORMATS`` must list them
in OpenCV's order; split per format, the order and the shared readers would be spread
over fifteen files.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

__all__ = ["CorruptImageError", "HeaderError", "ImageHeader", "read_header"]


class HeaderError(ValueError):
    """The header gives no size that can be trusted.

    Attributes
    ----------
    format : str or None
        The format OpenCV would decode the file as, or None for no known format.
    reason : str
        Why the size was not read, in words.
    """

    def __init__(self, reason, format=None):
        self.reason = reason
        self.format = format
        super().__init__(reason)


class CorruptImageError(HeaderError):
    """The file is truncated or corrupt in a way OpenCV only finds after allocating memory
    for it; it cannot be decoded, so it is refused whatever the pixel limit."""


class ImageHeader(NamedTuple):
    """What the header says, before decoding.

    Attributes
    ----------
    format : str
        The format OpenCV will decode the file as ("JPEG", "PNG", "TIFF", ...).
    width, height : int
        The image size, as stored (before any EXIF orientation).
    pixels : int
        The pixels the decoder allocates at once: ``width * height``, or more where the
        format makes it allocate more (TIFF tiles, AVIF frames and alpha planes).
    note : str
        Why ``pixels`` exceeds ``width * height``, in words ("" when it does not).
    """

    format: str
    width: int
    height: int
    pixels: int
    note: str = ""


def read_header(source) -> ImageHeader:
    """The format and size of an encoded image, from its header alone.

    Parameters
    ----------
    source : bytes, bytearray, memoryview or binary file
        The encoded image, or a seekable file opened for binary reading (read where the
        header lies, not in full: a TIFF's directory or an AVIF's metadata may be anywhere).

    Returns
    -------
    ImageHeader

    Raises
    ------
    HeaderError
        The format is unknown, or its size cannot be read (see the module docstring).
    CorruptImageError
        The file is truncated or corrupt in a way that would cost memory to find out.
    """
    src = _Source(source)
    head = src.read(0, _SIGNATURE_BYTES)
    for name, matches, reader in _FORMATS:
        if matches(head):
            try:
                size = reader(src)
            except HeaderError as error:
                error.format = name
                raise
            width, height = size[0], size[1]
            if width <= 0 or height <= 0:
                raise HeaderError(f"a {name} header with a size of {width} x {height}", name)
            pixels, note = (size[2], size[3]) if len(size) > 2 else (width * height, "")
            return ImageHeader(name, width, height, max(pixels, width * height), note)
    raise HeaderError("no image format OpenCV decodes starts this way")


# -- reading bytes -----------------------------------------------------------------------------

# OpenCV compares the first bytes against each decoder's signature; the longest it reads is
# AVIF's 500 (the others need at most 32, WebP's).
_SIGNATURE_BYTES = 500


class _Source:
    """Random access to the bytes of a buffer or a binary file, a block at a time for files
    (headers are read a few bytes at a time, often near each other)."""

    _BLOCK = 4096

    def __init__(self, source):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._file, self._buf, self._start = None, memoryview(source).cast("B"), 0
            self.size = len(self._buf)
        else:
            self._file, self._buf, self._start = source, memoryview(b""), 0
            self.size = source.seek(0, 2)

    def read(self, offset, n):
        """Up to n bytes at offset (fewer at the end of the file)."""
        end = min(offset + n, self.size)
        if offset < 0 or offset >= end:
            return b""
        if not (self._start <= offset and end <= self._start + len(self._buf)):
            self._file.seek(offset)
            self._buf, self._start = memoryview(self._file.read(max(end - offset, self._BLOCK))), offset
        return bytes(self._buf[offset - self._start:end - self._start])

    def need(self, offset, n, what):
        """Exactly n bytes at offset, or HeaderError naming what was cut short."""
        data = self.read(offset, n)
        if len(data) < n:
            raise HeaderError(f"the file ends inside its {what} (truncated?)")
        return data


class _Bytes:
    """One byte after another from a _Source, as the decoders' byte streams read headers;
    reading past the end raises, as their getByte() throws."""

    def __init__(self, src, pos, what):
        self.src, self.pos, self.what = src, pos, what
        self._block, self._block_start = b"", pos

    def next(self):
        at = self.pos - self._block_start
        if at >= len(self._block):
            self._block, self._block_start, at = self.src.read(self.pos, 4096), self.pos, 0
            if not self._block:
                raise HeaderError(f"the file ends inside its {self.what} (truncated?)")
        self.pos += 1
        return self._block[at]


def _isspace(code):  # C's isspace() in the "C" locale
    return code == 0x20 or 0x09 <= code <= 0x0D


def _isdigit(code):
    return 0x30 <= code <= 0x39


def _c_string(data):
    """The bytes a C string function sees: up to the first NUL."""
    return data.split(b"\0", 1)[0]


def _c_int(value):
    """An int as strtol then a cast to int give it on a 64-bit machine: clamped to the long
    range, then wrapped to 32 bits (so "4294967297" is 1 to the decoder)."""
    value = max(-(1 << 63), min(value, (1 << 63) - 1))
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


# -- BMP (grfmt_bmp.cpp) -----------------------------------------------------------------------

def _bmp(src):
    (header_size,) = struct.unpack("<i", src.need(14, 4, "BMP header"))
    if header_size >= 36:
        width, height = struct.unpack("<ii", src.need(18, 8, "BMP header"))
    elif header_size == 12:  # OS/2 1.x: 16-bit sizes
        width, height = struct.unpack("<HH", src.need(18, 4, "BMP header"))
    else:
        raise HeaderError(f"a BMP header of {header_size} bytes, which OpenCV does not read")
    # A negative height is a top-down bitmap of |height| rows.
    return width, abs(height)


# -- GIF (grfmt_gif.cpp) -----------------------------------------------------------------------

def _gif(src):
    # The logical screen: every frame must fit in it, and it is what OpenCV allocates.
    return struct.unpack("<HH", src.need(6, 4, "GIF screen descriptor"))


# -- Radiance HDR (rgbe.cpp, RGBE_ReadHeader) --------------------------------------------------

# sscanf(buf, "-Y %d +X %d"): a space in the format matches any run of white space, %d an
# optionally signed decimal.
_HDR_SIZE = re.compile(rb"-Y\s*([+-]?\d+)\s*\+X\s*([+-]?\d+)")


def _fgets(src, pos):
    """The next piece fgets(buf, 128, fp) returns: up to 127 bytes, ending after a newline.
    A longer line is split, and its remainder is read as the next line, as in OpenCV."""
    piece = src.read(pos, 127)
    newline = piece.find(b"\n")
    if newline >= 0:
        piece = piece[:newline + 1]
    return piece, pos + len(piece)


def _hdr(src):
    _, pos = _fgets(src, 0)  # "#?RADIANCE" or "#?RGBE": the signature matched already
    has_format = False
    while True:
        line, pos = _fgets(src, pos)
        if not line:
            raise HeaderError("the file ends inside its Radiance header (truncated?)")
        if line[:1] == b"\n":  # the blank line that ends the header
            break
        if line[:1] != b"#" and _c_string(line) == b"FORMAT=32-bit_rle_rgbe\n":
            has_format = True
    if not has_format:
        raise HeaderError("a Radiance header without FORMAT=32-bit_rle_rgbe")
    line, _ = _fgets(src, pos)
    match = _HDR_SIZE.match(_c_string(line))
    if match is None:
        raise HeaderError("a Radiance header without a '-Y height +X width' line (the only "
                          "orientation OpenCV reads)")
    height, width = (int(group) for group in match.groups())
    if max(abs(width), abs(height)) >= 1 << 31:  # past int: what sscanf stores is undefined
        raise HeaderError("a Radiance size out of range")
    return width, height


# -- JPEG (libjpeg's jdmarker.c: first_marker, next_marker, read_markers) -------------------------

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB})
_NO_PARAMETERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7
_SKIPPED = frozenset({0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})  # tables, APPn, COM
_MAX_JPEG_MARKERS = 65_536  # a photo has tens; walking millions of empty ones is only slow


def _jpeg_next_marker(src, pos):
    """libjpeg's next_marker: skip any bytes up to an 0xFF, then the 0xFF fill bytes; an
    0xFF 0x00 pair is stuffed data, not a marker. Returns (marker, position after it)."""
    while True:
        while True:
            block = src.read(pos, 4096)
            if not block:
                raise HeaderError("the file ends before its JPEG frame header (truncated?)")
            found = block.find(b"\xff")
            if found >= 0:
                pos += found + 1
                break
            pos += len(block)
        stream = _Bytes(src, pos, "JPEG markers")
        code = stream.next()
        while code == 0xFF:
            code = stream.next()
        pos = stream.pos
        if code != 0:
            return code, pos


def _jpeg(src):
    # The image is the first frame header (SOFn) before the first scan: libjpeg stops at
    # the first SOS and refuses a second SOF, so a later SOF can never be the decoded one.
    pos = 2  # after SOI
    for _ in range(_MAX_JPEG_MARKERS):
        marker, pos = _jpeg_next_marker(src, pos)
        if marker in _SOF:
            height, width = struct.unpack(">HH", src.need(pos + 3, 4, "JPEG frame header"))
            return width, height
        if marker in _NO_PARAMETERS:
            continue
        if marker in _SKIPPED:
            (length,) = struct.unpack(">H", src.need(pos, 2, "JPEG markers"))
            pos += 2 + max(length - 2, 0)
            continue
        if marker in (0xDA, 0xD9):
            raise HeaderError("a JPEG with no frame header before its scan")
        raise HeaderError(f"a JPEG whose marker 0x{marker:02X} comes before its frame header "
                          "(libjpeg refuses it)")
    raise HeaderError(f"a JPEG with more than {_MAX_JPEG_MARKERS:,} markers before its frame header")


# -- WebP (libwebp's WebPGetFeatures on the first 32 bytes, as grfmt_webp.cpp calls it) ---------

_WEBP_HEADER = 32
_MAX_CHUNK_PAYLOAD = 0xFFFFFFFF - 8 - 1


def _vp8_size(data, chunk_size):
    """libwebp's VP8GetInfo: a key frame's 14-bit sizes (the scale bits are not sizes)."""
    if len(data) < 10 or data[3:6] != b"\x9d\x01\x2a":
        return None
    bits = data[0] | data[1] << 8 | data[2] << 16
    width, height = (data[6] | data[7] << 8) & 0x3FFF, (data[8] | data[9] << 8) & 0x3FFF
    if bits & 1 or (bits >> 1) & 7 > 3 or not (bits >> 4) & 1 or bits >> 5 >= chunk_size:
        return None
    return (width, height) if width and height else None


def _vp8l_size(data):
    """libwebp's VP8LGetInfo: 14 bits each for width - 1 and height - 1, LSB first."""
    if len(data) < 5 or data[0] != 0x2F or data[4] >> 5:
        return None
    bits = int.from_bytes(data[1:5], "little")
    return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1


def _webp_features(head):
    """(width, height) as libwebp's ParseHeadersInternal gives them for these 32 bytes with
    no decoding structures (OpenCV's checkSignature and readHeader), or None where it fails.
    Note that libwebp also takes a bare VP8 or VP8L bitstream, with no RIFF container."""
    if len(head) < _WEBP_HEADER:
        return None
    data, riff_size = head[:_WEBP_HEADER], 0
    if data[:4] == b"RIFF":
        size = int.from_bytes(data[4:8], "little")
        if data[8:12] != b"WEBP" or size < 12 or size > _MAX_CHUNK_PAYLOAD:
            return None
        riff_size, data = size, data[12:]
    canvas = None
    if data[:4] == b"VP8X":  # the extended format: the canvas size is the image's
        if int.from_bytes(data[4:8], "little") != 10 or not riff_size:
            return None
        flags = int.from_bytes(data[8:12], "little")
        canvas = 1 + int.from_bytes(data[12:15], "little"), 1 + int.from_bytes(data[15:18], "little")
        if canvas[0] * canvas[1] >= 1 << 32:
            return None
        if flags & 0x02:  # animated: the canvas is what WebPAnimDecoder allocates
            return canvas
        data = data[18:]
    # Below, running out of the 32 bytes is "not enough data": success with a VP8X canvas,
    # failure without one.
    if len(data) < 4:
        return canvas
    if (riff_size and canvas) or (not riff_size and data[:4] == b"ALPH"):
        total = 4 + 8 + 10
        while True:  # optional chunks (ICCP, ALPH, ...) up to the VP8/VP8L one
            if len(data) < 8:
                return canvas
            chunk_size = int.from_bytes(data[4:8], "little")
            if chunk_size > _MAX_CHUNK_PAYLOAD:
                return None
            disk_size = (8 + chunk_size + 1) & ~1
            total = (total + disk_size) & 0xFFFFFFFF
            if riff_size and total > riff_size:
                return None
            if data[:4] in (b"VP8 ", b"VP8L"):
                break
            if len(data) < disk_size:
                return canvas
            data = data[disk_size:]
    if len(data) < 8:
        return canvas
    if data[:4] in (b"VP8 ", b"VP8L"):
        size = int.from_bytes(data[4:8], "little")
        if riff_size >= 12 and size > riff_size - 12:
            return None
        lossless, compressed, data = data[:4] == b"VP8L", size, data[8:]
    else:  # a bare bitstream
        lossless, compressed = _vp8l_size(data) is not None, len(data)
    if compressed > _MAX_CHUNK_PAYLOAD:
        return None
    if len(data) < (5 if lossless else 10):
        return canvas
    size = _vp8l_size(data) if lossless else _vp8_size(data, compressed)
    if size is None or (canvas is not None and size != canvas):
        return None
    return size


def _webp(src):
    return _webp_features(src.read(0, _WEBP_HEADER))


# -- Sun raster (grfmt_sunras.cpp) -------------------------------------------------------------

def _sun_raster(src):
    return struct.unpack(">ii", src.need(4, 8, "Sun raster header"))


# -- PBM/PGM/PPM (grfmt_pxm.cpp, ReadNumber) -------------------------------------------------------

def _pxm_number(stream):
    """PxM's ReadNumber: white space and '#' comments (to the end of the line) before the
    digits; the byte after them is consumed; more than INT_MAX fails."""
    code = stream.next()
    while not _isdigit(code):
        if code == ord("#"):
            while code not in (0x0A, 0x0D):
                code = stream.next()
            code = stream.next()
        elif _isspace(code):
            while _isspace(code):
                code = stream.next()
        else:
            raise HeaderError(f"a PNM header with an unexpected byte 0x{code:02x}")
    value = 0
    while True:
        value = value * 10 + code - 0x30
        if value > 0x7FFFFFFF:
            raise HeaderError("a PNM size out of range")
        code = stream.next()
        if not _isdigit(code):
            return value


def _pxm(src):
    stream = _Bytes(src, 2, "PNM header")
    width = _pxm_number(stream)
    return width, _pxm_number(stream)


# -- PAM (grfmt_pam.cpp, ReadPAMHeaderLine and ParseInt) ---------------------------------------------

_PAM_FIELDS = (b"ENDHDR", b"HEIGHT", b"WIDTH", b"DEPTH", b"MAXVAL", b"TUPLTYPE")


def _pam_line(stream):
    """One header line: (identifier or None for a comment, value)."""
    code = stream.next()
    while _isspace(code):
        code = stream.next()
    if code == ord("#"):
        while code not in (0x0A, 0x0D):
            code = stream.next()
        return None, b""
    ident = bytearray()
    while len(ident) < 8 and not _isspace(code):
        ident.append(code)
        code = stream.next()
    if not _isspace(code):
        raise HeaderError("a PAM header with an identifier over 8 characters")
    ident = _c_string(bytes(ident))
    if ident not in _PAM_FIELDS:
        raise HeaderError(f"a PAM header with an unknown field {ident!r}")
    if code in (0x0A, 0x0D):
        return ident, b""
    code = stream.next()
    while _isspace(code):
        code = stream.next()
    value = bytearray()
    while len(value) < 255 and code not in (0x0A, 0x0D):
        value.append(code)
        code = stream.next()
    if code not in (0x0A, 0x0D):
        raise HeaderError("a PAM header value over 255 characters")
    return ident, bytes(value).rstrip(b" \t\n\v\f\r")


def _pam_int(value):
    """ParseInt: an optional '-', digits (below INT_MAX), and nothing after them."""
    text = _c_string(value)
    match = re.fullmatch(rb"(-?)(\d*)", text)
    if match is None or (match[1] and not match[2]):
        raise HeaderError(f"a PAM header with a size {text!r} that is not a number")
    number = int(match[2] or b"0")
    if number >= 0x7FFFFFFF:
        raise HeaderError("a PAM size out of range")
    return -number if match[1] else number


def _pam(src):
    stream = _Bytes(src, 2, "PAM header")
    if stream.next() not in (0x0A, 0x0D):
        raise HeaderError("a PAM header whose first line is not 'P7'")
    sizes = {}
    while True:
        ident, value = _pam_line(stream)
        if ident == b"ENDHDR":
            break
        if ident in (b"WIDTH", b"HEIGHT"):
            if ident in sizes:
                raise HeaderError(f"a PAM header with two {ident.decode()} lines")
            sizes[ident] = _pam_int(value)
    if len(sizes) < 2:
        raise HeaderError("a PAM header without WIDTH and HEIGHT")
    return sizes[b"WIDTH"], sizes[b"HEIGHT"]


# -- PFM (grfmt_pfm.cpp, read_number) --------------------------------------------------------------

def _pfm_number(stream):
    """read_number<int>: up to 2048 bytes to a white space (consumed), then atoi."""
    token = bytearray()
    while len(token) < 2048:
        code = stream.next()
        if _isspace(code):
            break
        if code >= 0x80:  # white space or not by the C library's locale: not guessed
            raise HeaderError("a PFM header with a non-ASCII byte")
        token.append(code)
    match = re.match(rb"[+-]?\d+", _c_string(bytes(token)))
    return _c_int(int(match[0])) if match else 0


def _pfm(src):
    stream = _Bytes(src, 2, "PFM header")
    if stream.next() != 0x0A:
        raise HeaderError("a PFM header whose first line is not 'PF' or 'Pf'")
    width = _pfm_number(stream)
    return width, _pfm_number(stream)


# -- TIFF (libtiff: the first directory, TIFFReadDirEntryLong) ----------------------------------------

_TIFF_UINT32_TYPES = {1: "B", 6: "b", 3: "H", 8: "h", 4: "I", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_IMAGE_WIDTH, _IMAGE_LENGTH, _TILE_WIDTH, _TILE_LENGTH = 256, 257, 322, 323


def _tiff_uint32(entry, order, tag):
    typ, count, value = entry
    code = _TIFF_UINT32_TYPES.get(typ)
    if count != 1 or code is None or struct.calcsize(code) > len(value):
        raise HeaderError(f"a TIFF tag {tag} of type {typ} x {count}, which is not read")
    (number,) = struct.unpack(order + code, value[:struct.calcsize(code)])
    if not 0 <= number <= 0xFFFFFFFF:
        raise HeaderError(f"a TIFF tag {tag} out of range")
    return number


def _tiff(src):
    head = src.need(0, 16 if src.read(2, 2) in (b"\x2b\x00", b"\x00\x2b") else 8, "TIFF header")
    order = "<" if head[:2] == b"II" else ">"
    if struct.unpack(order + "H", head[2:4])[0] == 42:
        (offset,) = struct.unpack(order + "I", head[4:8])
        count_code, entry_code = "H", "HHI4s"
    else:  # BigTIFF
        byte_size, zero, offset = struct.unpack(order + "HHQ", head[4:16])
        if byte_size != 8 or zero != 0:
            raise HeaderError("a BigTIFF header libtiff refuses")
        count_code, entry_code = "Q", "HHQ8s"
    count_size, entry_size = struct.calcsize(order + count_code), struct.calcsize(order + entry_code)
    (count,) = struct.unpack(order + count_code, src.need(offset, count_size, "TIFF directory"))
    if count > 4096:  # libtiff's sanity check
        raise HeaderError("a TIFF directory of more than 4096 entries")
    entries = src.need(offset + count_size, count * entry_size, "TIFF directory")
    tags = {}
    for tag, typ, n, value in struct.iter_unpack(order + entry_code, entries):
        # libtiff ignores the later copies of a tag that occurs twice.
        if tag in (_IMAGE_WIDTH, _IMAGE_LENGTH, _TILE_WIDTH, _TILE_LENGTH) and tag not in tags:
            tags[tag] = (typ, n, value)
    if _IMAGE_WIDTH not in tags or _IMAGE_LENGTH not in tags:
        raise HeaderError("a TIFF directory without ImageWidth and ImageLength")
    width = _tiff_uint32(tags[_IMAGE_WIDTH], order, _IMAGE_WIDTH)
    height = _tiff_uint32(tags[_IMAGE_LENGTH], order, _IMAGE_LENGTH)
    if _TILE_WIDTH not in tags and _TILE_LENGTH not in tags:
        # Strips need no more: libtiff bounds a strip by the image height.
        return width, height
    # OpenCV decodes tile by tile into a buffer of one whole tile (zero-filled by libtiff
    # past the image's edge), however small the image; a missing or zero size means the
    # image's, as in OpenCV.
    tile_width = _tiff_uint32(tags[_TILE_WIDTH], order, _TILE_WIDTH) if _TILE_WIDTH in tags else 0
    tile_length = _tiff_uint32(tags[_TILE_LENGTH], order, _TILE_LENGTH) if _TILE_LENGTH in tags else 0
    tile_width, tile_length = tile_width or width, tile_length or height
    return width, height, tile_width * tile_length, f"its {tile_width} x {tile_length} tiles are decoded whole"


# -- PNG (grfmt_png.cpp) -----------------------------------------------------------------------

def _png(src):
    length, kind, width, height = struct.unpack(">I4sII", src.need(8, 16, "PNG header"))
    if kind != b"IHDR" or length != 13:
        raise HeaderError("a PNG whose first chunk is not IHDR")
    # OpenCV reads a chunk by first allocating its declared length (up to 4 GB), then
    # finding the file too short: a chunk that runs past the end is refused here instead.
    pos = 8
    while pos + 8 <= src.size:
        length, kind = struct.unpack(">I4s", src.read(pos, 8))
        end = pos + 12 + length
        if end > src.size:
            raise CorruptImageError(
                f"a truncated or corrupt PNG: its {kind.decode('latin-1')!r} chunk at byte {pos:,} "
                f"claims {length:,} bytes, {end - src.size:,} past the end of the file")
        if kind == b"IEND":
            break
        pos = end
    return width, height


# -- JPEG 2000 (OpenJPEG: the SIZ marker of the codestream) -------------------------------------------

def _j2k_at(src, offset):
    siz = src.need(offset, 24, "JPEG 2000 codestream header")
    if siz[:4] != b"\xff\x4f\xff\x51":
        raise HeaderError("a JPEG 2000 codestream whose SIZ marker does not follow SOC")
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", siz[8:24])
    # The image area is [XOsiz, Xsiz) x [YOsiz, Ysiz); OpenCV allocates its size.
    return xsiz - x0, ysiz - y0


def _j2k(src):
    return _j2k_at(src, 0)


def _jp2(src):
    # The size is the codestream's (its SIZ), not the jp2h/ihdr box's: OpenJPEG decodes the
    # codestream of the first jp2c box.
    pos = 0
    while True:
        head = src.read(pos, 16)
        if len(head) < 8:
            raise HeaderError("a JP2 file with no codestream box")
        length, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if length == 1:
            if len(head) < 16:
                raise HeaderError("the file ends inside its JP2 boxes (truncated?)")
            (length,), header = struct.unpack(">Q", head[8:16]), 16
        elif length == 0:
            length = src.size - pos
        if kind == b"jp2c":
            return _j2k_at(src, pos + header)
        if length < header:
            raise HeaderError("a JP2 box of impossible length")
        pos += length


# -- AVIF (libavif: ISO-BMFF metadata, and the AV1 sequence headers of its coded items) ---------------

def _iso_boxes(src, start, end):
    """(type, payload start, end) of the ISO-BMFF boxes in [start, end)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", src.need(pos, 8, "AVIF boxes"))
        header = 8
        if size == 1:
            (size,), header = struct.unpack(">Q", src.need(pos + 8, 8, "AVIF boxes")), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise HeaderError(f"an AVIF box {kind!r} that runs past its container (truncated?)")
        yield kind, pos + header, pos + size
        pos += size


def _uint(data, pos, size):
    if size not in (0, 2, 4, 8) or pos + size > len(data):
        raise HeaderError("an AVIF item location that cannot be read")
    return int.from_bytes(data[pos:pos + size], "big"), pos + size


def _avif_items(src, meta_start, meta_end):
    """From the meta box: item types, item extents [(construction, offset, length)], the
    idat box's (start, end), and every ispe (width, height)."""
    types, locations, idat, extents_of = {}, {}, None, {}
    sizes = []
    for kind, start, end in _iso_boxes(src, meta_start + 4, meta_end):  # meta is a FullBox
        if kind == b"iinf":
            version = src.need(start, 1, "AVIF item list")[0]
            first = start + 4 + (2 if version == 0 else 4)
            for entry, entry_start, entry_end in _iso_boxes(src, first, end):
                data = src.read(entry_start, min(entry_end - entry_start, 14))
                if entry == b"infe" and data[:1] >= b"\x02":  # older infe versions have no type
                    id_size = 2 if data[0] == 2 else 4
                    if len(data) < 10 + id_size:
                        raise HeaderError("an AVIF item entry cut short")
                    item = int.from_bytes(data[4:4 + id_size], "big")
                    types[item] = data[6 + id_size:10 + id_size]
        elif kind == b"iloc":
            data = src.need(start, end - start, "AVIF item locations")
            version = data[0]
            offset_size, length_size = data[4] >> 4, data[4] & 15
            base_size, index_size = data[5] >> 4, (data[5] & 15 if version in (1, 2) else 0)
            count, pos = _uint(data, 6, 4 if version == 2 else 2)
            for _ in range(count):
                item, pos = _uint(data, pos, 4 if version == 2 else 2)
                construction = 0
                if version in (1, 2):
                    construction, pos = _uint(data, pos, 2)
                    construction &= 15
                reference, pos = _uint(data, pos, 2)
                base, pos = _uint(data, pos, base_size)
                n_extents, pos = _uint(data, pos, 2)
                extents = []
                for _ in range(n_extents):
                    _, pos = _uint(data, pos, index_size)
                    offset, pos = _uint(data, pos, offset_size)
                    length, pos = _uint(data, pos, length_size)
                    extents.append((base + offset, length))
                locations[item] = (construction, reference, extents)
        elif kind == b"idat":
            idat = (start, end)
        elif kind == b"iprp":
            for child, child_start, child_end in _iso_boxes(src, start, end):
                if child == b"ipco":
                    for prop, prop_start, _ in _iso_boxes(src, child_start, child_end):
                        if prop == b"ispe":
                            sizes.append(struct.unpack(">II", src.need(prop_start + 4, 8, "AVIF ispe")))
    for item, (construction, reference, extents) in locations.items():
        if reference != 0 or construction not in (0, 1) or (construction == 1 and idat is None):
            extents_of[item] = None  # data elsewhere: libavif refuses these
            continue
        origin, limit = (0, src.size) if construction == 0 else idat
        pieces = []
        for offset, length in extents:
            start = origin + offset
            stop = limit if length == 0 else start + length
            if stop > limit:
                raise HeaderError("an AVIF item whose data runs past the end of the file (truncated?)")
            pieces.append((start, stop - start))
        extents_of[item] = pieces
    return types, extents_of, sizes


class _ItemData:
    """The bytes of an item, its extents read as one."""

    def __init__(self, src, extents):
        self.src, self.extents = src, extents
        self.size = sum(length for _, length in extents)

    def read(self, pos, n):
        out = bytearray()
        for start, length in self.extents:
            if pos < length and n > 0:
                piece = self.src.read(start + pos, min(n, length - pos))
                out += piece
                n -= len(piece)
                pos = 0
            else:
                pos -= length
        return bytes(out)


class _Bits:
    """MSB-first bit reader (the AV1 specification's f(n))."""

    def __init__(self, data):
        self.value, self.left = int.from_bytes(data, "big"), 8 * len(data)

    def f(self, n):
        if n > self.left:
            raise HeaderError("an AV1 sequence header cut short")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def uvlc(self):
        zeros = 0
        while not self.f(1):
            zeros += 1
            if zeros >= 32:
                return (1 << 32) - 1
        return self.f(zeros) + (1 << zeros) - 1


def _av1_max_frame(payload):
    """max_frame_width x max_frame_height of an AV1 sequence header OBU (section 5.5): no
    frame of the sequence may be larger, so the decoder allocates at most this."""
    bits = _Bits(payload)
    bits.f(3)  # seq_profile
    bits.f(1)  # still_picture
    if bits.f(1):  # reduced_still_picture_header
        bits.f(5)  # seq_level_idx[0]
    else:
        decoder_model_info, delay_length = 0, 0
        if bits.f(1):  # timing_info_present_flag
            bits.f(32), bits.f(32)  # num_units_in_display_tick, time_scale
            if bits.f(1):  # equal_picture_interval
                bits.uvlc()
            decoder_model_info = bits.f(1)
            if decoder_model_info:
                delay_length = bits.f(5) + 1
                bits.f(32), bits.f(5), bits.f(5)
        initial_display_delay = bits.f(1)
        for _ in range(bits.f(5) + 1):  # operating points
            bits.f(12)  # operating_point_idc
            if bits.f(5) > 7:  # seq_level_idx
                bits.f(1)  # seq_tier
            if decoder_model_info and bits.f(1):
                bits.f(delay_length), bits.f(delay_length), bits.f(1)
            if initial_display_delay and bits.f(1):
                bits.f(4)
    width_bits, height_bits = bits.f(4) + 1, bits.f(4) + 1
    return bits.f(width_bits) + 1, bits.f(height_bits) + 1


_MAX_OBUS = 10_000  # a still image has a handful; far more is not a photo


def _av1_frame_pixels(item):
    """The largest frame any sequence header of an AV1 item allows, in pixels."""
    pos, largest = 0, 0
    for _ in range(_MAX_OBUS):
        if pos >= item.size:
            break
        header = item.read(pos, 2)
        if header[0] & 0x80:
            raise HeaderError("an AV1 item with a malformed OBU")
        obu_type, has_extension, has_size = header[0] >> 3 & 15, header[0] >> 2 & 1, header[0] >> 1 & 1
        pos += 1 + has_extension
        if has_size:
            size = 0
            for i in range(8):  # leb128
                byte = item.read(pos, 1)
                if not byte:
                    raise HeaderError("an AV1 item cut short")
                pos += 1
                size |= (byte[0] & 0x7F) << (7 * i)
                if not byte[0] & 0x80:
                    break
        else:
            size = item.size - pos
        if obu_type == 1:  # OBU_SEQUENCE_HEADER
            width, height = _av1_max_frame(item.read(pos, min(size, 4096)))
            largest = max(largest, width * height)
        pos += size
    else:
        raise HeaderError("an AV1 item of too many OBUs")
    if not largest:
        raise HeaderError("an AV1 item without a sequence header")
    return largest


def _avif(src):
    boxes = list(_iso_boxes(src, 0, src.size))
    _, ftyp_start, ftyp_end = boxes[0]
    ftyp = src.need(ftyp_start, ftyp_end - ftyp_start, "AVIF file type")
    brands = {ftyp[i:i + 4] for i in range(0, len(ftyp) - 3, 4) if i != 4}  # minus minor_version
    if not brands & {b"avif", b"avis"}:
        raise HeaderError("an ISO media file that is not AVIF")
    if any(kind == b"moov" for kind, _, _ in boxes):
        raise HeaderError("an AVIF image sequence (the size of its frames is not read)")
    meta = [(start, end) for kind, start, end in boxes if kind == b"meta"]
    if not meta:
        raise HeaderError("an AVIF without item metadata")
    types, extents_of, sizes = _avif_items(src, *meta[0])
    if not sizes:
        raise HeaderError("an AVIF without an image size (ispe) property")
    width, height = max(sizes, key=lambda size: size[0] * size[1])
    # libavif decodes the colour item (or every tile of a grid) and the alpha item, each
    # into a frame as large as its AV1 sequence header allows, whatever ispe says: all the
    # coded items are counted, together (thumbnails and gain maps too, which is cautious).
    coded = [item for item, kind in types.items() if kind == b"av01"]
    if not coded:
        raise HeaderError("an AVIF with no AV1-coded image")
    frames = 0
    for item in coded:
        if extents_of.get(item) is None:
            raise HeaderError("an AVIF whose image data is not in the file")
        frames += _av1_frame_pixels(_ItemData(src, extents_of[item]))
    largest = width * height
    for item, kind in types.items():  # a grid's canvas, from its ImageGrid payload
        if kind == b"grid" and extents_of.get(item):
            data = _ItemData(src, extents_of[item]).read(0, 12)
            field = 4 if len(data) >= 4 and data[1] & 1 else 2
            if len(data) >= 4 + 2 * field:
                grid_width = int.from_bytes(data[4:4 + field], "big")
                grid_height = int.from_bytes(data[4 + field:4 + 2 * field], "big")
                largest = max(largest, grid_width * grid_height)
    pixels = max(largest, frames)
    note = "its AV1-coded frames and planes, as their sequence headers size them" if pixels > width * height else ""
    return width, height, pixels, note


# -- formats without a size reader -------------------------------------------------------------

def _openexr(src):
    raise HeaderError("OpenEXR headers are not read")


# -- OpenCV's decoders, in its registration order --------------------------------------------------

def _starts(*prefixes):
    return lambda head: head.startswith(prefixes)


_FORMATS = (
    ("BMP", _starts(b"BM"), _bmp),
    ("GIF", _starts(b"GIF"), _gif),
    # libavif claims any file whose first box is ftyp (a truncated one too): nothing else
    # OpenCV decodes can start that way.
    ("AVIF", lambda head: head[4:8] == b"ftyp", _avif),
    ("Radiance HDR", _starts(b"#?RGBE", b"#?RADIANCE"), _hdr),
    ("JPEG", _starts(b"\xff\xd8\xff"), _jpeg),
    ("WebP", lambda head: _webp_features(head) is not None, _webp),
    ("Sun raster", _starts(b"\x59\xa6\x6a\x95"), _sun_raster),
    ("PNM", lambda head: len(head) >= 3 and head[:1] == b"P" and b"1"[0] <= head[1] <= b"6"[0]
     and _isspace(head[2]), _pxm),
    ("PAM", lambda head: len(head) >= 3 and head[:2] == b"P7" and _isspace(head[2]), _pam),
    ("PFM", lambda head: len(head) >= 3 and head[:2] in (b"Pf", b"PF") and _isspace(head[2]), _pfm),
    ("TIFF", _starts(b"II\x2a\x00", b"MM\x00\x2a", b"II\x2b\x00", b"MM\x00\x2b"), _tiff),
    ("PNG", _starts(b"\x89PNG\r\n\x1a\n"), _png),
    ("JPEG 2000", _starts(b"\x00\x00\x00\x0cjP  \r\n\x87\n"), _jp2),
    ("JPEG 2000 codestream", _starts(b"\xff\x4f\xff\x51"), _j2k),
    ("OpenEXR", _starts(b"\x76\x2f\x31\x01"), _openexr),
)
