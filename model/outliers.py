"""Generated NON-garment images, sized like the catalogue's photos, for outlier exposure and its evaluation.

A shop's image store holds more than garments: empty studio shots, "image not available" placeholders,
banners, colour swatch cards, size charts, corrupted uploads that decode to noise. The photo model is
trained to be unsure of such images (outlier exposure) and the review threshold is set on them.

Families come in two disjoint sets: :data:`TRAIN_FAMILIES` may be used in training and threshold fitting;
:data:`HELD_OUT_FAMILIES` never are, so evaluation measures how flagging generalises to kinds of
non-garment nobody showed the model. ``render_outlier(rng, family=None)`` draws a family from
``families`` (default: the training families). Deterministic for a given ``rng`` state. numpy + PIL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .colour import PALETTE
from .render import RenderStyle, _backdrop, _canvas_size

_STYLE = RenderStyle()
_WORDS = ("SALE", "NEW IN", "50% OFF", "FREE SHIPPING", "SUMMER", "LIMITED", "BEST SELLER", "SIZE GUIDE",
          "COMING SOON", "OUT OF STOCK", "GIFT CARD", "BLACK FRIDAY", "-30%", "ECO")


@dataclass
class OutlierImage:
    image: Image.Image  # RGB
    family: str


def _colour(rng: np.random.Generator, vivid: bool = True) -> tuple[int, int, int]:
    if vivid and rng.random() < 0.6:
        names = list(PALETTE)
        c = np.array(PALETTE[names[int(rng.integers(len(names)))]], dtype=np.float64)
        c = np.clip(c + rng.uniform(-20, 20, 3), 0, 255)
    else:
        c = rng.uniform(0, 255, 3)
    return tuple(int(v) for v in c)


def _size(rng) -> tuple[int, int]:
    return _canvas_size(rng, _STYLE)


def _studio(rng, w: int, h: int) -> Image.Image:
    return _backdrop(rng, _STYLE, w, h)[0]


def _up(small: np.ndarray | Image.Image, w: int, h: int, smooth: bool = False) -> Image.Image:
    im = small if isinstance(small, Image.Image) else Image.fromarray(np.ascontiguousarray(small), "RGB")
    return im.resize((w, h), Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST)


# --------------------------------------------------------------------------- families


def blank(rng, w, h):
    """An empty studio shot: the backdrop alone (white, grey, cream or pastel, maybe graded)."""
    return _studio(rng, w, h)


def solid(rng, w, h):
    """One flat colour, edge to edge."""
    return Image.new("RGB", (w, h), _colour(rng))


def noise_uniform(rng, w, h):
    """Uniform RGB noise at a random grain (1-16 px)."""
    g = int(rng.choice([1, 2, 4, 8, 16]))
    return _up(rng.integers(0, 256, (max(1, h // g), max(1, w // g), 3), dtype=np.uint8), w, h)


def noise_gaussian(rng, w, h):
    """A colour plus Gaussian noise (sigma 15-80), at a random grain."""
    g = int(rng.choice([1, 2, 4, 8]))
    base = np.array(_colour(rng, vivid=False), dtype=np.float32)
    sigma = rng.uniform(15, 80)
    arr = base + rng.normal(0, sigma, (max(1, h // g), max(1, w // g), 3)).astype(np.float32)
    return _up(np.clip(arr, 0, 255).astype(np.uint8), w, h)


def salt_pepper(rng, w, h):
    """A backdrop sprinkled with black and white pixels (1-30 % of them)."""
    g = int(rng.choice([1, 2, 3]))
    hs, ws = max(1, h // g), max(1, w // g)
    arr = np.asarray(_studio(rng, ws, hs)).copy()
    p = rng.uniform(0.01, 0.3)
    u = rng.random((hs, ws))
    arr[u < p / 2] = 0
    arr[(u >= p / 2) & (u < p)] = 255
    return _up(arr, w, h)


def blotches(rng, w, h):
    """Smooth full-frame colour blotches (a low-resolution random colour field, upscaled)."""
    g = int(rng.integers(3, 9))
    return _up(rng.integers(0, 256, (g, g, 3), dtype=np.uint8), w, h, smooth=True)


def gradient_linear(rng, w, h):
    """Two colours, a linear ramp in any direction."""
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31 * 2 - 1
    t = np.clip((xx * math.cos(a) + yy * math.sin(a)) / 2 + 0.5, 0, 1)[..., None]
    return _up((c0 * (1 - t) + c1 * t).astype(np.uint8), w, h, smooth=True)


def gradient_radial(rng, w, h):
    """Two colours, a radial ramp from a random centre."""
    c0, c1 = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31 * 2 - 1
    t = np.clip(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / rng.uniform(0.8, 1.8), 0, 1)[..., None]
    return _up((c0 * (1 - t) + c1 * t).astype(np.uint8), w, h, smooth=True)


def _font(px: int):
    return ImageFont.load_default(size=max(8, px))


def banner(rng, w, h):
    """Text on a coloured band (a promotion banner uploaded as a product image)."""
    im = _studio(rng, w, h) if rng.random() < 0.5 else Image.new("RGB", (w, h), _colour(rng))
    d = ImageDraw.Draw(im)
    bh = int(h * rng.uniform(0.2, 0.5))
    top = int(rng.uniform(0, h - bh))
    d.rectangle((0, top, w, top + bh), fill=_colour(rng))
    text = _WORDS[int(rng.integers(len(_WORDS)))]
    size = int(bh * rng.uniform(0.35, 0.6))
    font = _font(size)
    tw = d.textlength(text, font=font)
    x = max(0, int((w - tw) * rng.uniform(0.1, 0.9)))
    d.text((x, top + (bh - size) // 2), text, fill=_colour(rng), font=font)
    return im


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rad = r if (not inner or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def shapes(rng, w, h):
    """1-5 circles, rectangles or polygons in flat colours on a studio backdrop."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 6))):
        r = min(w, h) * rng.uniform(0.08, 0.35)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        kind = int(rng.integers(3))
        col = _colour(rng)
        if kind == 0:
            d.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r), fill=col)
        elif kind == 1:
            d.rectangle((cx - r, cy - r * rng.uniform(0.3, 1.5), cx + r * rng.uniform(0.3, 1.5), cy + r), fill=col)
        else:
            d.polygon(_polygon(cx, cy, r, int(rng.integers(3, 8)), rng.uniform(0, math.pi)), fill=col)
    return im


def stars(rng, w, h):
    """1-4 stars (5-8 points) on a studio backdrop."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 5))):
        r = min(w, h) * rng.uniform(0.1, 0.4)
        pts = _polygon(rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, r, int(rng.integers(5, 9)),
                       rng.uniform(0, math.pi), inner=rng.uniform(0.35, 0.6))
        d.polygon(pts, fill=_colour(rng))
    return im


def blobs(rng, w, h):
    """One or two smooth random blobs (a radius with a few random harmonics) on a studio backdrop."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 3))):
        r0 = min(w, h) * rng.uniform(0.15, 0.4)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        amps = rng.uniform(0, 0.25, 4)
        phases = rng.uniform(0, 2 * math.pi, 4)
        pts = []
        for i in range(64):
            a = 2 * math.pi * i / 64
            rad = r0 * (1 + sum(amps[j] * math.sin((j + 2) * a + phases[j]) for j in range(4)))
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=_colour(rng))
    return im.filter(ImageFilter.BoxBlur(1))


def stripes(rng, w, h):
    """Full-frame stripes in two colours, any angle."""
    c0, c1 = np.array(_colour(rng), np.uint8), np.array(_colour(rng), np.uint8)
    g = 4
    hs, ws = h // g, w // g
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32)
    a = rng.uniform(0, math.pi)
    u = (xx * math.cos(a) + yy * math.sin(a)) / rng.uniform(4, 40)
    pat = (u - np.floor(u)) < rng.uniform(0.3, 0.7)
    return _up(np.where(pat[..., None], c0, c1), w, h)


def checks(rng, w, h):
    """Full-frame checks in two colours."""
    c0, c1 = np.array(_colour(rng), np.uint8), np.array(_colour(rng), np.uint8)
    g = 4
    hs, ws = h // g, w // g
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32)
    p = rng.uniform(4, 40)
    pat = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(bool)
    return _up(np.where(pat[..., None], c0, c1), w, h)


def placeholder(rng, w, h):
    """An "image not available" tile: a grey box with a crossed frame or a mountain-and-sun icon."""
    grey = int(rng.uniform(200, 245))
    im = Image.new("RGB", (w, h), (grey, grey, grey))
    d = ImageDraw.Draw(im)
    ink = (int(grey * 0.6),) * 3
    m = int(min(w, h) * rng.uniform(0.15, 0.3))
    lw = max(2, int(min(w, h) * 0.01))
    if rng.random() < 0.5:
        d.rectangle((m, m, w - m, h - m), outline=ink, width=lw)
        d.line((m, m, w - m, h - m), fill=ink, width=lw)
        d.line((m, h - m, w - m, m), fill=ink, width=lw)
    else:
        cx, cy, s = w / 2, h / 2, min(w, h) * 0.25
        d.polygon([(cx - s, cy + s * 0.6), (cx - s * 0.2, cy - s * 0.4), (cx + s * 0.3, cy + s * 0.6)], fill=ink)
        d.polygon([(cx, cy + s * 0.6), (cx + s * 0.5, cy), (cx + s, cy + s * 0.6)], fill=ink)
        d.ellipse((cx + s * 0.4, cy - s * 0.8, cx + s * 0.8, cy - s * 0.4), fill=ink)
    if rng.random() < 0.5:
        d.text((w * 0.3, h * 0.8), "no image", fill=ink, font=_font(int(min(w, h) * 0.05)))
    return im


def swatches(rng, w, h):
    """A colour card: a grid of 2x2 to 5x5 flat colour squares with gaps."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    n, m = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    gap = min(w, h) * 0.02
    cw, ch = (w - gap) / m, (h - gap) / n
    for i in range(n):
        for j in range(m):
            d.rectangle((gap + j * cw, gap + i * ch, (j + 1) * cw, (i + 1) * ch), fill=_colour(rng))
    return im


def text_page(rng, w, h):
    """A size chart or care label: lines of dark text on a light page."""
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.uniform(235, 255, 3)))
    d = ImageDraw.Draw(im)
    size = int(min(w, h) * rng.uniform(0.03, 0.06))
    font = _font(size)
    y = size
    words = ("XS", "S", "M", "L", "XL", "chest", "waist", "hip", "cm", "inch", "30", "wash 40", "cotton", "100%")
    while y < h - 2 * size:
        line = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(3, 9))))
        d.text((size, y), line, fill=(int(rng.uniform(0, 80)),) * 3, font=font)
        y += int(size * rng.uniform(1.3, 2.0))
    return im


def barcode(rng, w, h):
    """Black bars of random widths on white (a label photographed instead of the product)."""
    im = Image.new("RGB", (w, h), (250, 250, 250))
    d = ImageDraw.Draw(im)
    top, bottom = h * rng.uniform(0.1, 0.35), h * rng.uniform(0.65, 0.9)
    x = w * rng.uniform(0.05, 0.2)
    end = w * rng.uniform(0.8, 0.95)
    unit = max(2.0, w / 250)
    while x < end:
        bw = unit * int(rng.integers(1, 5))
        if rng.random() < 0.5:
            d.rectangle((x, top, x + bw, bottom), fill=(10, 10, 10))
        x += bw
    return im


def polygon(rng, w, h):
    """One garment-sized irregular polygon (5-12 corners at random radii), flat or lightly shaded, maybe
    over a soft shadow: a silhouette that is no garment (a box, a sign, a cut-out)."""
    im = _studio(rng, w, h)
    r0 = min(w, h) * rng.uniform(0.2, 0.42)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    n = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = r0 * rng.uniform(0.45, 1.0, n)
    pts = [(cx + r * math.cos(a), cy + r * math.sin(a) * rng.uniform(0.7, 1.3)) for a, r in zip(angles, radii, strict=True)]
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    if rng.random() < 0.5:
        shadow = mask.filter(ImageFilter.BoxBlur(max(2, int(min(w, h) * 0.01)))).point(lambda v: int(v * 0.2))
        im.paste((0, 0, 0), (int(rng.integers(-8, 9)), int(rng.integers(0, 12))), shadow)
    base = np.array(_colour(rng), np.float32)
    g = 16
    shade = 1 + rng.uniform(0, 0.15) * rng.standard_normal((g, g)).astype(np.float32)
    body = np.clip(base[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    im.paste(_up(body, w, h, smooth=True), (0, 0), mask)
    return im


def text_logo(rng, w, h):
    """A brand name or a word or two, large, on a studio backdrop (a logo uploaded as the product image)."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    words = _WORDS + ("BRAND", "studio", "Atelier", "Co.", "LOGO", "®", "HOME", "&")
    lines = int(rng.integers(1, 3))
    size = int(min(w, h) * rng.uniform(0.08, 0.2))
    font = _font(size)
    y = h * rng.uniform(0.2, 0.5)
    ink = _colour(rng)
    for _ in range(lines):
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 3))))
        x = w * rng.uniform(0.05, 0.4)
        d.text((x, y), text, fill=ink, font=font)
        y += size * rng.uniform(1.1, 1.6)
    return im


def rules(rng, w, h):
    """Ruled lines or a grid on a light page (an empty form, a measuring table)."""
    im = Image.new("RGB", (w, h), tuple(int(v) for v in rng.uniform(230, 255, 3)))
    d = ImageDraw.Draw(im)
    ink = (int(rng.uniform(0, 120)),) * 3 if rng.random() < 0.6 else _colour(rng)
    lw = max(1, int(min(w, h) * rng.uniform(0.002, 0.012)))
    step = min(w, h) * rng.uniform(0.04, 0.15)
    m = min(w, h) * rng.uniform(0.03, 0.2)
    y = m
    while y < h - m:
        d.line((m, y, w - m, y), fill=ink, width=lw)
        y += step
    if rng.random() < 0.6:
        x = m
        step_x = step * rng.uniform(0.8, 3)
        while x < w - m:
            d.line((x, m, x, h - m), fill=ink, width=lw)
            x += step_x
    return im


def scribble(rng, w, h):
    """A few thick random strokes (a pen test, a damaged scan)."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 5))):
        pts = [(rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h) for _ in range(int(rng.integers(3, 9)))]
        d.line(pts, fill=_colour(rng), width=max(2, int(min(w, h) * rng.uniform(0.01, 0.05))), joint="curve")
    return im


def rings(rng, w, h):
    """1-3 ellipse outlines or discs with holes (a logo ring, a roll of tape)."""
    im = _studio(rng, w, h)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(1, 4))):
        r = min(w, h) * rng.uniform(0.1, 0.35)
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        e = rng.uniform(0.6, 1.4)
        d.ellipse((cx - r, cy - r * e, cx + r, cy + r * e), outline=_colour(rng),
                  width=max(2, int(r * rng.uniform(0.1, 0.5))))
    return im


FAMILIES: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "blank": blank, "solid": solid, "noise-uniform": noise_uniform, "noise-gaussian": noise_gaussian,
    "gradient-linear": gradient_linear, "banner": banner, "shapes": shapes, "stripes": stripes,
    "placeholder": placeholder, "swatches": swatches,
    "salt-pepper": salt_pepper, "blotches": blotches, "gradient-radial": gradient_radial, "checks": checks,
    "stars": stars, "blobs": blobs, "text-page": text_page, "barcode": barcode,
    "polygon": polygon, "text-logo": text_logo, "rules": rules, "scribble": scribble, "rings": rings,
}
# The training families cover the kinds (empty frames, noise, full-frame patterns, flat objects and
# silhouettes, text and ruled graphics); the held-out ones are other members of the same kinds.
TRAIN_FAMILIES: tuple[str, ...] = ("blank", "solid", "noise-uniform", "noise-gaussian", "gradient-linear", "banner",
                                   "shapes", "stripes", "placeholder", "swatches", "polygon", "text-logo", "rules",
                                   "scribble", "rings")
HELD_OUT_FAMILIES: tuple[str, ...] = ("salt-pepper", "blotches", "gradient-radial", "checks", "stars", "blobs",
                                      "text-page", "barcode")


def render_outlier(rng: np.random.Generator, family: str | None = None,
                   families: Sequence[str] = TRAIN_FAMILIES) -> OutlierImage:
    """One non-garment image of ``family`` (default: a family drawn uniformly from ``families``)."""
    if family is None:
        family = families[int(rng.integers(len(families)))]
    if family not in FAMILIES:
        raise ValueError(f"unknown outlier family {family!r}; choose one of: {', '.join(FAMILIES)}")
    w, h = _size(rng)
    im = FAMILIES[family](rng, w, h)
    return OutlierImage(im.convert("RGB") if im.mode != "RGB" else im, family)
