"""THE preprocessing: image bytes -> the model's uint8 input, defined by the checkpoint, used by training
and serving alike. numpy + PIL, no torch; safe to run in threads (PIL releases the GIL while decoding).

A :class:`PreprocessSpec` says what the model was trained on: ``channels`` (1 or 3), ``input_size``,
how the picture is ``fit`` to a square (``pad``: keep the aspect ratio and pad with the backdrop colour;
``crop``: centre crop; ``stretch``: ignore the aspect ratio), whether it is first cropped to the
garment's box (``foreground_crop``, found against the fitted studio backdrop, see ``model.colour``),
the ``representation`` (``as-is``; ``invert``; ``distance``: the perceptual distance from the backdrop
as grey, garment light on black like Fashion-MNIST, whatever the backdrop's tint; ``lab-delta``, three
channels: that distance, the lightness difference from the backdrop and the chroma difference, each
centred so the backdrop is (0, 128, 128): the garment's shading and print survive, the tint does not),
and ``mean``/``std``
(applied later on tensors, ``model.data.to_input``). Its ``to_dict()`` goes into the checkpoint's JSON
metadata under ``"preprocess"``; :meth:`PreprocessSpec.from_checkpoint_meta` maps older metadata without
that key to the legacy spec, which reproduces the worker's original decoder byte for byte
(``tests/model/data/legacy_decode.json``: golden digests of its outputs).

Decoding keeps everything the worker's decoder does: a whitelist of formats (PIL would otherwise try
every plugin, EPS among them, which hands bytes to Ghostscript), the PNG CRC check (PIL skips it for
image data), the pixel limit on the *declared* size before any pixel is decoded, JPEG draft downscaling,
EXIF orientation, transparency onto white, 16-bit grey; every failure is a
:class:`model.errors.BadImage` with a short ``reason``: ``empty``, ``not_an_image``, ``truncated``,
``corrupt``, ``too_many_pixels``, ``bad_image``.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .colour import (
    FOREGROUND_DELTA_E,
    backdrop_distance,
    backdrop_surface,
    dominant_colours,
    fit_backdrop,
)
from .errors import BadImage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # never let PIL silently decode half an image
# Our own limit (declared width x height, checked before decoding) is the one that counts; PIL's hard
# limit (DecompressionBombError) still applies and is mapped to too_many_pixels.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")  # JPEG also opens MPO (multi-picture JPEG)
Image.init()  # register every plugin now, so that open(formats=...) finds WEBP and TIFF
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FITS = ("pad", "crop", "stretch")
REPRESENTATIONS = ("as-is", "invert", "distance", "lab-delta")
DELTA_GAIN = 1.25  # lab-delta: uint8 steps per Lab unit of lightness / chroma difference (±100 fits)
DISTANCE_FLOOR = 40.0  # ΔE that maps to white at least: a faint image is not stretched into loud noise


class DecodeError(BadImage):
    """A :class:`BadImage` raised by :func:`decode_image`; same ``(reason, message)`` order as the worker's."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class PreprocessSpec:
    channels: int = 1
    input_size: int = 28
    fit: str = "stretch"
    foreground_crop: bool = False
    representation: str = "as-is"
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    margin: float = 0.04  # around the foreground box, as a share of its long side
    analysis_size: int = 0  # long side (px) the backdrop and foreground are found at; 0: 3 x input_size

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, not {self.fit!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, not {self.representation!r}")
        if self.input_size < 1:
            raise ValueError("input_size must be positive")
        if self.representation == "lab-delta" and self.channels != 3:
            raise ValueError("the lab-delta representation has three channels")
        if len(self.mean) not in (1, self.channels) or len(self.std) != len(self.mean):
            raise ValueError("mean and std need one value, or one per channel")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def is_legacy(self) -> bool:
        """The worker's original decode: stretched, no foreground crop, pixels as they are (or inverted)."""
        return self.fit == "stretch" and not self.foreground_crop and self.representation in ("as-is", "invert")

    @property
    def needs_backdrop(self) -> bool:
        return self.foreground_crop or self.representation in ("distance", "lab-delta") or self.fit == "pad"

    @property
    def work_size(self) -> int:
        return self.analysis_size or 3 * self.input_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    @classmethod
    def from_checkpoint_meta(cls, meta: dict) -> PreprocessSpec:
        """The spec of a checkpoint: its ``"preprocess"`` entry, else (metadata written before the key
        existed) the legacy spec: stretched to ``input_size``, ``channels`` as stored, pixels as-is."""
        if meta.get("preprocess"):
            return cls.from_dict(meta["preprocess"])
        return cls(channels=int(meta["channels"]), input_size=int(meta["input_size"]), fit="stretch",
                   foreground_crop=False, representation="as-is",
                   mean=tuple(meta.get("mean", (0.5,))), std=tuple(meta.get("std", (0.5,))))


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


def to_mode(img: Image.Image, channels: int) -> Image.Image:
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


def open_image(data: bytes, max_pixels: int, draft: tuple[str, tuple[int, int]] | None = None) -> Image.Image:
    """Checked, decoded, oriented image (PIL, any mode). ``draft=(mode, (w, h))`` lets a JPEG be decoded
    already downscaled to at least ``(w, h)``. Raises :class:`DecodeError`."""
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
        if draft is not None and img.format in ("JPEG", "MPO"):
            img.draft(*draft)
        # Animated GIF / WebP / APNG and multi-page TIFF: open() leaves us on the first frame, which is
        # all we decode (never ask for n_frames: that walks, and decodes, every frame).
        img.load()
        return ImageOps.exif_transpose(img)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"not a recognised image format (accepted: {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", f"decompression bomb refused: {str(exc)[:200]}") from None
    except MemoryError:
        raise DecodeError("too_many_pixels", "image too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes raise anything (OSError, SyntaxError, struct.error, ...)
        raise _generic(exc) from None


def _generic(exc: BaseException) -> DecodeError:
    msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    reason = "truncated" if "truncated" in msg.lower() else "bad_image"
    return DecodeError(reason, f"cannot decode image: {msg[:200]}")


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` makes of one image: the model input and, when asked, the garment's colours."""

    array: np.ndarray  # uint8 (input_size, input_size, channels): exactly decode_image's
    # The garment's dominant palette colours, largest share first, with their share of its pixels; only
    # when asked (``colours=True``) and only for photo specs (a legacy spec fits no backdrop and decodes
    # grey): None otherwise, () when nothing stands out from the backdrop.
    colours: tuple[tuple[str, float], ...] | None = None


def decode_image(data: bytes, spec: PreprocessSpec, max_pixels: int, *, draft: bool = True) -> np.ndarray:
    """Bytes -> uint8 ``(input_size, input_size, channels)`` as ``spec`` says. One bad image raises
    :class:`DecodeError` (a :class:`BadImage`) and never fails the rest of its batch."""
    return decode(data, spec, max_pixels, draft=draft).array


def decode(data: bytes, spec: PreprocessSpec, max_pixels: int, *, draft: bool = True, colours: bool = False,
           max_colours: int = 2, min_share: float = 0.25) -> Decoded:
    """:func:`decode_image`, and with ``colours`` the garment's dominant colours (``model.colour``), named
    against the backdrop fitted for the model input: one fit per image. The array never depends on
    ``colours``: training (``decode_image``) and serving (``decode``) feed the network the same bytes."""
    size = spec.input_size
    if spec.is_legacy:
        mode = "L" if spec.channels == 1 else "RGB"
        want = (size, size)
    else:  # the garment may cover a third of the picture: decode big enough that it still fills the input
        mode = "RGB" if (spec.channels == 3 or spec.needs_backdrop) else "L"
        want = (spec.work_size, spec.work_size) if spec.foreground_crop else (size, size)
    img = open_image(data, max_pixels, (mode, want) if draft else None)
    try:
        return _preprocess(img, spec, colours=max_colours if colours else 0, min_share=min_share)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("too_many_pixels", "image too large to decode in memory") from None
    except Exception as exc:  # noqa: BLE001 - a lazily decoded frame can still fail here
        raise _generic(exc) from None


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """A decoded PIL image (any mode, oriented) -> uint8 ``(input_size, input_size, channels)``."""
    return _preprocess(img, spec).array


def _preprocess(img: Image.Image, spec: PreprocessSpec, *, colours: int = 0, min_share: float = 0.25) -> Decoded:
    size = spec.input_size
    if spec.is_legacy:
        img = to_mode(img, spec.channels)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
        if spec.representation == "invert":
            arr = 255 - arr
        return Decoded(arr[:, :, None] if arr.ndim == 2 else arr)

    rgb_img = to_mode(img, 3)
    # Analysis (backdrop fit, foreground, distance) at a small working size: cost independent of the photo.
    w, h = rgb_img.size
    k = spec.work_size / max(w, h)
    if k < 1:
        work = rgb_img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    else:
        work = rgb_img
    rgb = np.asarray(work, dtype=np.uint8)
    coef = fit_backdrop(rgb)
    needs_dist = spec.foreground_crop or spec.representation in ("distance", "lab-delta")
    dist = lab = bg_lab = None
    if needs_dist:
        dist, lab, bg_lab = backdrop_distance(rgb, coef)

    if spec.representation in ("distance", "lab-delta"):
        scale = max(float(np.percentile(dist, 99.5)), DISTANCE_FLOOR)
        plane = np.clip(dist * (255.0 / scale), 0, 255).astype(np.uint8)[..., None]
        pad_value: tuple[int, ...] = (0,)
        if spec.representation == "lab-delta":
            d_l = lab[..., 0] - bg_lab[..., 0]
            d_c = np.hypot(lab[..., 1], lab[..., 2]) - np.hypot(bg_lab[..., 1], bg_lab[..., 2])
            extra = np.clip(128 + DELTA_GAIN * np.stack([d_l, d_c], -1), 0, 255).astype(np.uint8)
            plane = np.concatenate([plane, extra], -1)
            pad_value = (0, 128, 128)
    else:
        surf = backdrop_surface(rgb, coef)
        border = np.concatenate([surf[0], surf[-1], surf[:, 0], surf[:, -1]])
        bg = np.median(border, 0)
        if spec.channels == 1:
            plane = np.asarray(work.convert("L"), dtype=np.uint8)[..., None]
            bg = np.array([0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]])
        else:
            plane = rgb
        if spec.representation == "invert":
            plane, bg = 255 - plane, 255 - bg
        pad_value = tuple(int(round(float(v))) for v in bg)

    if spec.foreground_crop:
        plane = _crop_to_box(plane, foreground_box(dist), spec.margin, pad_value)
    out = _fit(plane, size, spec.fit, pad_value)
    if spec.channels == 3 and out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif spec.channels == 1 and out.shape[2] == 3:
        out = np.asarray(Image.fromarray(out, "RGB").convert("L"), dtype=np.uint8)[..., None]
    out = np.ascontiguousarray(out)
    if not colours:
        return Decoded(out)
    # Named on the decoded picture (before the reduction to the working size: point samples of the garment,
    # not averages of its pattern), against the backdrop already fitted (its surface is in normalised
    # coordinates, so the fit holds at any resolution).
    found = dominant_colours(np.asarray(rgb_img, dtype=np.uint8), colours, min_share=min_share, coef=coef)
    return Decoded(out, tuple(found))


def to_tensor(batch, spec: PreprocessSpec, device=None, channels_last: bool = False):
    """uint8 NHWC images (numpy or torch, as :func:`decode_image` makes them) -> the network's input:
    float32 NCHW on ``device``, at ``spec.input_size``, normalised by ``spec.mean`` / ``spec.std``
    (``model.data.to_input``). Training and the predictor both call this (torch is imported here only)."""
    import torch

    from .data import fit_channels, to_input

    if isinstance(batch, torch.Tensor):
        x = batch
    else:
        arr = np.ascontiguousarray(batch, dtype=np.uint8)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    x = fit_channels(x.to(device or x.device, non_blocking=True), spec.channels)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)
    return to_input(x, mean, std, spec.input_size, channels_last)


def foreground_box(dist: np.ndarray, threshold: float = FOREGROUND_DELTA_E) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the pixels above ``threshold``, ignoring rows and columns with only a
    stray pixel or two (JPEG ringing, noise); None when there is no foreground."""
    mask = dist > threshold
    h, w = mask.shape
    rows = mask.sum(1) >= max(1, int(0.02 * w))
    cols = mask.sum(0) >= max(1, int(0.02 * h))
    if not rows.any() or not cols.any():
        return None
    ys, xs = np.nonzero(rows)[0], np.nonzero(cols)[0]
    return int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1


def _crop_to_box(plane: np.ndarray, box, margin: float, pad_value) -> np.ndarray:
    """The box, grown by ``margin`` of its long side and squared around its centre; the parts outside
    the picture are filled with ``pad_value``."""
    h, w = plane.shape[:2]
    if box is None:
        return plane
    top, left, bottom, right = box
    side = max(bottom - top, right - left)
    side = int(math.ceil(side * (1 + 2 * margin)))
    cy, cx = (top + bottom) / 2, (left + right) / 2
    t2, l2 = int(round(cy - side / 2)), int(round(cx - side / 2))
    out = np.empty((side, side, plane.shape[2]), dtype=np.uint8)
    out[:] = np.asarray(pad_value, dtype=np.uint8)
    st, sl = max(t2, 0), max(l2, 0)
    sb, sr = min(t2 + side, h), min(l2 + side, w)
    if sb > st and sr > sl:
        out[st - t2 : sb - t2, sl - l2 : sr - l2] = plane[st:sb, sl:sr]
    return out


def _fit(plane: np.ndarray, size: int, fit: str, pad_value) -> np.ndarray:
    h, w, c = plane.shape
    im = Image.fromarray(plane[..., 0] if c == 1 else plane, "L" if c == 1 else "RGB")
    if fit == "stretch":
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    elif fit == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BILINEAR)
    else:  # pad: the long side becomes size, centred on the backdrop colour
        k = size / max(w, h)
        nw, nh = max(1, round(w * k)), max(1, round(h * k))
        inner = im.resize((nw, nh), Image.Resampling.BILINEAR)
        fill = pad_value[0] if c == 1 else tuple(pad_value)
        im = Image.new(im.mode, (size, size), fill)
        im.paste(inner, ((size - nw) // 2, (size - nh) // 2))
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
