"""Bytes -> model-ready uint8 arrays. Pure functions, safe to run in threads (PIL releases the GIL).

Every refusal is a :class:`catalog.errors.BadImage` with a short ``reason`` code that ends up in
``tag_state.reason``: ``empty``, ``not_an_image``, ``truncated``, ``corrupt``, ``too_many_pixels``,
``bad_image``.

Only the formats a product photo comes in are opened (:data:`FORMATS`): PIL would otherwise try every
plugin it has, EPS among them, which hands the bytes to Ghostscript.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catalog.errors import BadImage

# Never let PIL silently decode half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own limit (the declared width x height, checked below before any pixel is decoded) is the one
# that counts; PIL's warning band below its hard limit would only repeat it in the log. PIL's hard
# limit (DecompressionBombError, 2x its warning limit) still applies and is mapped to too_many_pixels.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")  # JPEG also opens MPO (multi-picture JPEG)
Image.init()  # register every plugin now, so that open(formats=...) finds WEBP and TIFF
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DecodeError(BadImage):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_png_chunks(data: bytes) -> None:
    """Verify every PNG chunk's CRC up to IEND (PIL skips the check for image data, so a flipped bit in
    IDAT would otherwise decode to wrong pixels and be tagged). Costs one crc32 pass over the file."""
    pos, end = len(PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > end:
            raise DecodeError("truncated", "PNG ends before its IEND chunk (truncated file)")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body_end = pos + 8 + length
        if length > 0x7FFFFFFF or body_end + 4 > end:
            raise DecodeError("truncated", f"PNG chunk {kind!r} runs past the end of the file (truncated)")
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(memoryview(data)[pos + 4 : body_end]) != crc:
            name = kind.decode("latin-1") if kind.isalpha() else repr(kind)
            raise DecodeError("corrupt", f"PNG chunk {name} fails its CRC check (corrupt file)")
        if kind == b"IEND":
            return
        pos = body_end + 4


def decode_image(data: bytes, size: int, channels: int, max_pixels: int, *, draft: bool = True) -> np.ndarray:
    """Decode, orient (EXIF), convert and resize one image to ``(size, size, channels)`` uint8.

    The pixel limit is checked on the *declared* dimensions before any pixel is decoded, so a
    decompression bomb costs only its header. JPEGs are downscaled while decoding (``draft``),
    which is several times faster for product photos much larger than the model input
    (``draft=False`` only for the benchmark that measures how much).
    Any failure (whatever PIL raises on hostile bytes) is a DecodeError: one bad image never
    fails the rest of its batch.
    """
    if not data:
        raise DecodeError("empty", "image is empty (0 bytes)")
    try:
        if data.startswith(PNG_SIGNATURE):
            check_png_chunks(data)
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise DecodeError(
                "too_many_pixels", f"image declares {width}x{height} pixels, over the limit of {max_pixels}"
            )
        if draft and img.format in ("JPEG", "MPO"):
            mode = "L" if channels == 1 else "RGB"
            img.draft(mode, (size, size))
        # Animated GIF / WebP / APNG and multi-page TIFF: open() leaves us on the first frame, which is
        # all we decode (never ask for n_frames: that walks, and decodes, every frame).
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_mode(img, channels)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"not a recognised image format (accepted: {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", f"decompression bomb refused: {str(exc)[:200]}") from None
    except MemoryError:
        raise DecodeError("too_many_pixels", "image too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes raise anything (OSError, SyntaxError, struct.error, ...)
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        reason = "truncated" if "truncated" in msg.lower() else "bad_image"
        raise DecodeError(reason, f"cannot decode image: {msg[:200]}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any mode (palette with transparency, 16-bit, CMYK, RGBA, ...) to L or RGB on white."""
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if img.mode in ("P", "PA") or (img.mode == "LA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        peak = max(int(arr.max()), 1)
        scale = 255.0 / (65535 if peak > 255 else 255)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    return img.convert(target)
