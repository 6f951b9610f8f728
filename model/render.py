"""Render a 28 px Fashion-MNIST item as a colour product photo on a light studio backdrop. numpy + PIL.

This is the "photo catalog" the photo model trains on: the item's intensity gives the garment's
silhouette (holes filled) and its shading; a palette colour (``model.colour.PALETTE``, jittered) and a
texture (plain, heather, stripes, checks, dots) give it colour; it is scaled to a share of the canvas,
rotated a little, placed anywhere, optionally over a soft drop shadow, on a flat or graded backdrop with
an optional vignette, under a mild global light change.

Speed matters (70,000 photos): everything per-pixel happens at a small working resolution (the garment
at ~6x its 28 px, the backdrop at 24 px) and PIL's C code does the one upscale, the paste and the light
change (a lookup table) at full size. Deterministic for a given ``rng`` state.

``render_photo(item, rng, **style)``: keyword arguments override :class:`RenderStyle` fields, e.g.
``item_scale=(0.3, 0.95), shadow_p=0.0, lighting=0.2`` for a deliberately different catalogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image, ImageFilter

from .colour import NAMES, PALETTE, PALETTE_LAB, colour_name, srgb_to_lab

TEXTURES = ("plain", "heather", "stripes", "checks", "dots")
BACKDROPS = ("white", "light-grey", "cream", "pastel")


@dataclass(frozen=True)
class RenderStyle:
    """Every knob of the renderer; defaults are the training catalogue."""

    size: tuple[int, int] = (600, 1000)  # both canvas sides within this range
    aspects: tuple[tuple[int, int], ...] = ((1, 1), (4, 5), (3, 4), (2, 3), (5, 4), (4, 3))  # width:height
    item_scale: tuple[float, float] = (0.4, 0.88)  # garment's long side / canvas's short side
    rotation: float = 10.0  # max degrees either way
    centre_bias: float = 0.0  # 0: uniform placement; 1: always centred
    backdrops: tuple[str, ...] = BACKDROPS
    backdrop_weights: tuple[float, ...] = (0.35, 0.25, 0.15, 0.25)
    pastel_saturation: tuple[float, float] = (0.05, 0.16)
    backdrop_value: tuple[float, float] = (0.88, 1.0)
    gradient_p: float = 0.5
    gradient_strength: tuple[float, float] = (0.03, 0.10)
    vignette_p: float = 0.3
    vignette_strength: tuple[float, float] = (0.04, 0.15)
    shadow_p: float = 0.6
    shadow_opacity: tuple[float, float] = (0.10, 0.28)
    textures: tuple[str, ...] = TEXTURES
    texture_weights: tuple[float, ...] = (0.45, 0.2, 0.15, 0.1, 0.1)
    colours: tuple[str, ...] = NAMES
    colour_jitter: float = 10.0  # max RGB offset per channel (kept only if the name does not change)
    shade_floor: tuple[float, float] = (0.5, 0.8)  # brightness of the item's darkest pixels
    # Fashion-MNIST's intensity is the *inverted* brightness of the original photo (a dark coat is bright in
    # it); shading of either sign is equally plausible, so each photo draws one (see _garment).
    inverted_p: float = 0.5
    lighting: float = 0.1  # strength of the global brightness / contrast / colour-cast change
    work_scale: int = 6  # working resolution = 28 px x this


# A deliberately different catalogue, for robustness figures (never trained on): more tinted and darker
# backdrops, stronger gradients and vignettes, garments from a third to the whole frame, more rotation, no
# drop shadow, stronger light changes, other aspect ratios, mostly inverted shading.
ROBUST_STYLE: dict = dict(
    backdrop_weights=(0.15, 0.2, 0.2, 0.45), pastel_saturation=(0.12, 0.35), backdrop_value=(0.72, 0.97),
    item_scale=(0.30, 0.95), shadow_p=0.0, lighting=0.2, rotation=15.0, gradient_p=0.7,
    gradient_strength=(0.05, 0.2), vignette_p=0.5, vignette_strength=(0.1, 0.3),
    aspects=((1, 1), (2, 3), (3, 2), (9, 16), (16, 9), (4, 5)), inverted_p=0.8, shade_floor=(0.4, 0.9),
    texture_weights=(0.3, 0.3, 0.15, 0.15, 0.1),
)


@dataclass
class RenderedPhoto:
    image: Image.Image  # RGB
    colours: tuple[str, ...]  # 1-2 palette names, the larger share first
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the pasted garment (before clipping)
    info: dict


def _choice(rng: np.random.Generator, items, weights=None):
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]) * 255


def _canvas_size(rng: np.random.Generator, st: RenderStyle) -> tuple[int, int]:
    lo, hi = st.size
    for _ in range(20):
        aw, ah = _choice(rng, st.aspects)
        k_lo = max(lo / aw, lo / ah)
        k_hi = min(hi / aw, hi / ah)
        if k_lo <= k_hi:
            k = rng.uniform(k_lo, k_hi)
            return int(round(aw * k)), int(round(ah * k))
    side = int(rng.integers(lo, hi + 1))
    return side, side


def _backdrop(rng: np.random.Generator, st: RenderStyle, w: int, h: int) -> tuple[Image.Image, str, np.ndarray]:
    kind = _choice(rng, st.backdrops, st.backdrop_weights)
    v = rng.uniform(*st.backdrop_value)
    if kind == "white":
        base = np.array([255.0, 255.0, 255.0]) * max(v, 0.95) - rng.uniform(0, 4, 3)
    elif kind == "light-grey":
        base = np.full(3, 255.0 * min(v, 0.95) * rng.uniform(0.9, 0.97)) + rng.uniform(-2, 2, 3)
    elif kind == "cream":
        base = _hsv_to_rgb(rng.uniform(0.08, 0.14), rng.uniform(0.06, 0.14), max(v, 0.93))
    elif kind == "pastel":
        base = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*st.pastel_saturation), v)
    else:  # a named palette colour as a backdrop (for deliberately different catalogues)
        base = np.array(PALETTE[kind], dtype=np.float64)
    g = 24
    gy, gx = np.mgrid[0:g, 0:g].astype(np.float64) / (g - 1) * 2 - 1
    field = np.ones((g, g))
    if rng.random() < st.gradient_p:
        a = rng.uniform(0, 2 * math.pi)
        field = field + rng.uniform(*st.gradient_strength) * (gx * math.cos(a) + gy * math.sin(a)) / 2 - 0.02
    if rng.random() < st.vignette_p:
        field = field - rng.uniform(*st.vignette_strength) * (gx**2 + gy**2) / 2
    small = np.clip(base[None, None, :] * field[..., None], 0, 255).astype(np.uint8)
    # Bilinear to 1/8 size, then nearest: a 10 % gradient over 1,000 px changes one level every ~40 px,
    # so the 8 px blocks are invisible, and this is ten times faster than one bilinear upscale.
    mid = Image.fromarray(small, "RGB").resize((max(1, w // 8), max(1, h // 8)), Image.Resampling.BILINEAR)
    return mid.resize((w, h), Image.Resampling.NEAREST), kind, base


def _fill_holes(solid: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the border through background: the silhouette with its holes filled."""
    free = np.pad(~solid, 1, constant_values=True)
    outside = np.zeros_like(free)
    outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
    while True:  # grow the outside through free pixels (4-neighbours) until it stops changing
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside[1:-1, 1:-1]
        outside = grown


def _pick_colour(rng: np.random.Generator, st: RenderStyle, avoid: str | None = None) -> tuple[str, np.ndarray]:
    names = [n for n in st.colours if n != avoid] if avoid else list(st.colours)
    if avoid:  # a second colour must be clearly different from the first
        lab0 = PALETTE_LAB[NAMES.index(avoid)]
        names = [n for n in names if np.linalg.norm(PALETTE_LAB[NAMES.index(n)] - lab0) > 30] or names
    name = _choice(rng, names)
    rgb = np.array(PALETTE[name], dtype=np.float64)
    for _ in range(4):
        cand = np.clip(rgb + rng.uniform(-st.colour_jitter, st.colour_jitter, 3), 0, 255)
        if colour_name(cand) == name:
            return name, cand
    return name, rgb


def _texture(rng, kind: str, h: int, w: int) -> tuple[np.ndarray | None, float]:
    """(pattern in [0, 1] (h, w) or None, its share). Duties avoid the 0.15-0.35 band, so whether the
    second colour counts as a true colour is never a coin toss."""
    if kind not in ("stripes", "checks", "dots"):
        return None, 0.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(7, 22)
    if kind == "stripes":
        duty = rng.uniform(0.06, 0.14) if rng.random() < 0.35 else rng.uniform(0.35, 0.6)
        a = rng.choice([0.0, math.pi / 2, rng.uniform(0, math.pi)])
        u = (xx * math.cos(a) + yy * math.sin(a)) / period
        pat = ((u - np.floor(u)) < duty).astype(np.float32)
    elif kind == "checks":
        duty = rng.uniform(0.22, 0.32)  # share 2d(1-d) in 0.34-0.44: the base colour stays the larger
        u, v = xx / period, yy / period
        pat = (((u - np.floor(u)) < duty) ^ ((v - np.floor(v)) < duty)).astype(np.float32)
    else:
        r = rng.uniform(0.12, 0.2) if rng.random() < 0.4 else rng.uniform(0.34, 0.45)
        u, v = xx / period, yy / period
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        pat = ((du * du + dv * dv) < r * r).astype(np.float32)
    return pat, float(pat.mean())


def _garment(rng, st: RenderStyle, item28: np.ndarray):
    """RGBA garment at working resolution, its true colours and texture name."""
    item = np.asarray(item28, dtype=np.uint8)
    solid = item > 8
    if not solid.any():
        solid = item > 0
    ys, xs = np.nonzero(solid)
    if len(ys) == 0:
        raise ValueError("the item is blank: nothing to render")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    item, solid = item[y0:y1, x0:x1], _fill_holes(solid[y0:y1, x0:x1])
    k = st.work_scale
    hw, ww = item.shape[0] * k, item.shape[1] * k
    inten = np.asarray(Image.fromarray(item, "L").resize((ww, hw), Image.Resampling.BICUBIC), dtype=np.float32)
    # The silhouette: the item's own anti-aliased intensity, with the filled holes solid, upscaled smoothly
    # and then sharpened, so the contour follows the item's shape instead of its 28 px staircase.
    core = solid.copy()  # the silhouette less its rim: solid whatever its shade (a dark print is not a hole)
    core[1:] &= solid[:-1]
    core[:-1] &= solid[1:]
    core[:, 1:] &= solid[:, :-1]
    core[:, :-1] &= solid[:, 1:]
    soft = np.where(core, 255, np.clip(item.astype(np.int32) * 4, 0, 255)).astype(np.uint8)
    alpha_im = Image.fromarray(soft, "L").resize((ww, hw), Image.Resampling.BICUBIC)
    alpha = np.asarray(alpha_im.filter(ImageFilter.GaussianBlur(0.45 * k)), dtype=np.float32) / 255.0
    a = np.clip((alpha - 0.3) / 0.25, 0, 1)
    alpha = a * a * (3 - 2 * a)  # smoothstep: a crisp but anti-aliased contour
    inside = inten[alpha > 0.5]
    top = max(float(np.percentile(inside, 90)) if inside.size else 255.0, 40.0)
    floor = rng.uniform(*st.shade_floor)
    rel = np.clip(inten / top, 0, 1)
    inverted = bool(rng.random() < st.inverted_p)
    if inverted:
        # The item's detail with the photo's own polarity: what is brighter than the garment's median in
        # Fashion-MNIST is darker cloth, what is darker is lighter cloth (a print, a collar). The body stays
        # at its palette colour, so the colour truth holds either way.
        med = float(np.median(rel[alpha > 0.5])) if inside.size else 0.8
        darker = np.clip((rel - med) / max(1 - med, 0.05), 0, 1)
        lighter = np.clip((med - rel) / max(med, 0.05), 0, 1)
        shade = 1 - (1 - floor) * darker + 0.35 * lighter
    else:
        shade = floor + (1 - floor) * rel
    texture = _choice(rng, st.textures, st.texture_weights)
    name1, rgb1 = _pick_colour(rng, st)
    colours: tuple[str, ...] = (name1,)
    if texture == "heather":
        noise = rng.normal(0, 1, (hw // 2 + 1, ww // 2 + 1)).astype(np.float32)
        noise = np.repeat(np.repeat(noise, 2, 0), 2, 1)[:hw, :ww]
        shade = shade * (1 + rng.uniform(0.04, 0.1) * noise)
    col = np.broadcast_to(rgb1.astype(np.float32), (hw, ww, 3))
    pat, share = _texture(rng, texture, hw, ww)
    if pat is not None:
        name2, rgb2 = _pick_colour(rng, st, avoid=name1)
        col = col + pat[..., None] * (rgb2 - rgb1).astype(np.float32)
        shown = float((pat * alpha).sum() / max(alpha.sum(), 1e-6))
        if shown >= 0.25:
            colours = (name2, name1) if shown > 0.5 else (name1, name2)
        share = shown
    rgba = np.empty((hw, ww, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(col * shade[..., None], 0, 255)
    rgba[..., 3] = np.round(alpha * 255)
    return rgba, colours, texture, share, rgb1, inverted


def render_photo(item28: np.ndarray, rng: np.random.Generator, **style) -> RenderedPhoto:
    """One product photo of ``item28`` (uint8 28x28, light garment on black); see the module doc."""
    st = replace(RenderStyle(), **style) if style else RenderStyle()
    w, h = _canvas_size(rng, st)
    canvas, backdrop_kind, backdrop_rgb = _backdrop(rng, st, w, h)
    garment, colours, texture, share, base_rgb, inverted = _garment(rng, st, item28)

    angle = rng.uniform(-st.rotation, st.rotation)
    if rng.random() < 0.5:
        garment = garment[:, ::-1]
    # RGB and alpha go separately: PIL premultiplies RGBA on every resample, which costs 3x. The colour
    # field covers the whole box (and the rotation fills with the base colour), so no dark fringe.
    fill = tuple(int(c) for c in base_rgb)
    body = Image.fromarray(np.ascontiguousarray(garment[..., :3]), "RGB")
    body = body.rotate(angle, Image.Resampling.BILINEAR, expand=True, fillcolor=fill)
    alpha = Image.fromarray(np.ascontiguousarray(garment[..., 3]), "L")
    alpha = alpha.rotate(angle, Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    scale = rng.uniform(*st.item_scale)
    gw, gh = body.size
    f = scale * min(w, h) / max(gw, gh)
    tw, th = max(1, int(round(gw * f))), max(1, int(round(gh * f)))
    body = body.resize((tw, th), Image.Resampling.BILINEAR)
    alpha = alpha.resize((tw, th), Image.Resampling.BILINEAR)

    def place(total: int, size: int) -> int:
        lo, hi = min(0, total - size), max(0, total - size)
        centre = (total - size) / 2
        pos = rng.uniform(lo, hi) if hi > lo else centre
        return int(round(st.centre_bias * centre + (1 - st.centre_bias) * pos))

    x, y = place(w, tw), place(h, th)
    if rng.random() < st.shadow_p:
        d = max(2, int(0.02 * max(tw, th)))
        small = alpha.resize((max(1, tw // 8), max(1, th // 8)), Image.Resampling.BILINEAR)
        small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0)))
        opacity = rng.uniform(*st.shadow_opacity)
        shadow = small.resize((max(1, tw // 2), max(1, th // 2)), Image.Resampling.BILINEAR)
        shadow = shadow.resize((tw, th), Image.Resampling.NEAREST).point(lambda v, o=opacity: int(v * o))
        dx, dy = int(rng.integers(-d, d + 1)), int(rng.integers(0, 2 * d + 1))
        canvas.paste((0, 0, 0), (x + dx, y + dy, x + dx + tw, y + dy + th), shadow)
    canvas.paste(body, (x, y), alpha)

    if st.lighting > 0:
        s = st.lighting
        gain = 1 + rng.uniform(-s, s) + np.array([1, 0, -1]) * rng.uniform(-s, s) / 2
        gamma = math.exp(rng.uniform(-s, s) * 1.5)
        v = np.arange(256) / 255.0
        lut = np.concatenate([np.clip(255 * (v**gamma) * g, 0, 255) for g in gain]).round().astype(np.uint8)
        canvas = canvas.point(lut.tolist())
    info = {"backdrop": backdrop_kind, "backdrop_rgb": [round(float(c)) for c in backdrop_rgb], "texture": texture,
            "pattern_share": round(share, 3), "inverted": inverted, "scale": round(scale, 3), "angle": round(angle, 2), "size": (w, h)}
    return RenderedPhoto(canvas, colours, (x, y, x + tw, y + th), info)


def style_fields() -> tuple[str, ...]:
    """Names accepted as ``**style`` by :func:`render_photo`."""
    return tuple(f.name for f in fields(RenderStyle))


def lab_of(rgb) -> np.ndarray:
    """Lab of one sRGB triple (a convenience for tests and the prototype)."""
    return srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(1, 3))[0]
