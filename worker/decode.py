"""Bytes -> model-ready uint8 arrays. Pure functions, safe to run in threads (PIL releases the GIL).

Every refusal is a :class:`catalog.errors.BadImage` with a short ``reason`` code that ends up in
``tag_state.reason``: ``empty``, ``not_an_image``, ``truncated``, ``too_many_pixels``, ``bad_image``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catalog.errors import BadImage

# Never let PIL silently decode half an image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(BadImage):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, size: int, channels: int, max_pixels: int) -> np.ndarray:
    """Decode, orient (EXIF), convert and resize one image to ``(size, size, channels)`` uint8.

    The pixel limit is checked on the *declared* dimensions before any pixel is decoded, so a
    decompression bomb costs only its header. JPEGs are downscaled while decoding (``draft``),
    which is several times faster for product photos much larger than the model input.
    """
    if not data:
        raise DecodeError("empty", "image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    "too_many_pixels", f"image declares {width}x{height} pixels, over the limit of {max_pixels}"
                )
            if img.format == "JPEG":
                mode = "L" if channels == 1 else "RGB"
                img.draft(mode, (size, size))
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, channels)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            arr = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_many_pixels", f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
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
