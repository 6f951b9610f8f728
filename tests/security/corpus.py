"""A corpus of broken, odd and hostile image files, generated in memory (PIL / numpy / zlib, no downloads).

Each entry says what styletag must do with it: ``tagged``, or the ``tag_state.reason`` it fails with.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

BOMB_SIDE = 50_000  # declared width and height of the bombs: 2.5e9 pixels, 2.5 GB as 8-bit gray


@dataclass(frozen=True)
class Sample:
    name: str  # also the file name in the store
    data: bytes
    expect: str  # "tagged" or the failure reason


def _noise(h: int, w: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid-looking 8-bit grayscale PNG declaring side x side pixels; its IDAT holds a few rows only."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side + 1) * 4, 9)  # filter byte + zeros for 4 rows
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def gif_bomb(side: int = 60_000) -> bytes:
    """A GIF89a whose logical screen and single frame declare side x side pixels (a few bytes of data)."""
    header = b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, side, side, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def png_bad_crc() -> bytes:
    data = bytearray(_save(Image.fromarray(_noise(32, 32, seed=3), "L"), "PNG"))
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    data[idat + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """A 40x20 (landscape as stored) JPEG, dark top half and bright bottom half, EXIF orientation 6
    ("rotate 90 degrees clockwise to display"): shown, it is 20x40 with the bright half on the LEFT."""
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[10:, :] = 255
    img = Image.fromarray(arr, "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def exif_references() -> tuple[bytes, bytes]:
    """The EXIF-rotated JPEG's own pixels as lossless PNGs without EXIF: (as displayed, as stored)."""
    img = Image.open(io.BytesIO(exif_rotated_jpeg()))
    img.load()
    shown = ImageOps.exif_transpose(img)
    stored = Image.frombytes(img.mode, img.size, img.tobytes())  # no EXIF
    return _save(shown, "PNG"), _save(stored, "PNG")


def cmyk_jpeg() -> bytes:
    return _save(Image.fromarray(_noise(48, 48, 4, seed=4), "CMYK"), "JPEG", quality=90)


def gray16_png() -> bytes:
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    return _save(Image.fromarray(arr), "PNG")  # mode I;16


def palette_transparent_png() -> bytes:
    img = Image.fromarray(_noise(32, 32, seed=5) // 64, "L").convert("P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 - 4) * 3)
    return _save(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.fromarray(_noise(30, 30, seed=s), "L").convert("P") for s in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def padded_png(total: int) -> bytes:
    """A valid PNG padded with trailing zero bytes (after IEND, ignored by decoders) to exactly ``total``."""
    base = _save(Image.fromarray(_noise(16, 16, seed=6), "L"), "PNG")
    assert len(base) <= total
    return base + b"\x00" * (total - len(base))


def corpus(max_bytes: int) -> list[Sample]:
    jpeg = _save(Image.fromarray(_noise(64, 64, 3, seed=1), "RGB"), "JPEG", quality=90)
    return [
        Sample("zero.jpg", b"", "empty"),
        Sample("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated"),
        Sample("bad_crc.png", png_bad_crc(), "corrupt"),
        Sample("error_page.jpg", b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n",
               "not_an_image"),
        Sample("postscript.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not_an_image"),
        Sample("cmyk.jpg", cmyk_jpeg(), "tagged"),
        Sample("gray16.png", gray16_png(), "tagged"),
        Sample("palette_transparent.png", palette_transparent_png(), "tagged"),
        Sample("animated.gif", animated_gif(), "tagged"),
        Sample("photo.webp", _save(Image.fromarray(_noise(40, 40, 3, seed=7), "RGB"), "WEBP", quality=80), "tagged"),
        Sample("scan.tiff", _save(Image.fromarray(_noise(40, 40, 3, seed=8), "RGB"), "TIFF"), "tagged"),
        Sample("exif_rotated.jpg", exif_rotated_jpeg(), "tagged"),
        Sample("exif_reference_shown.png", exif_references()[0], "tagged"),
        Sample("exif_reference_stored.png", exif_references()[1], "tagged"),
        Sample("one_pixel.png", _save(Image.new("L", (1, 1), 128), "PNG"), "tagged"),
        Sample("wide_10000x10.png", _save(Image.fromarray(_noise(10, 10_000, seed=9), "L"), "PNG"), "tagged"),
        Sample("bomb.png", png_bomb(), "too_many_pixels"),
        Sample("bomb.gif", gif_bomb(), "too_many_pixels"),
        Sample("at_limit.png", padded_png(max_bytes), "tagged"),
        Sample("over_limit.png", padded_png(max_bytes + 1), "too_large"),
    ]
