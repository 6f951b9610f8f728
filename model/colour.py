"""Named garment colours, the studio backdrop and the garment's foreground. numpy only (no torch, no PIL).

The palette is small on purpose: a shop's colour facet has about a dozen values, and a name is only
useful when a person would agree with it. Names are matched in CIE Lab (D65), where distances follow
perceived differences, with lightness down-weighted (:data:`L_WEIGHT`) so that a shaded fold of a navy
coat is still navy and not black.

The backdrop is modelled as a smooth surface (a quadratic in x and y per channel, fitted robustly to a
band along the image border): that covers flat backdrops, linear gradients and radial vignettes exactly,
and a garment touching the border only costs the band pixels it covers (they are dropped as outliers).
A soft drop shadow is a darkening with the backdrop's chroma; :func:`distance_from_backdrop` forgives
a little of it (:data:`SHADOW_ALLOWANCE`) so shadows do not become foreground.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

# name -> sRGB. Chosen to be far apart in Lab and to cover what a fashion catalogue's colour facet lists.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 24),
    "white": (244, 244, 240),
    "grey": (128, 128, 128),
    "navy": (30, 40, 90),
    "blue": (40, 90, 200),
    "light-blue": (140, 190, 232),
    "red": (200, 30, 40),
    "pink": (238, 150, 180),
    "orange": (240, 130, 30),
    "yellow": (245, 212, 50),
    "green": (40, 140, 60),
    "olive": (110, 112, 40),
    "brown": (105, 65, 38),
    "beige": (222, 203, 168),
    "purple": (115, 55, 150),
}
NAMES: tuple[str, ...] = tuple(PALETTE)
L_WEIGHT = 0.6  # weight of lightness against chroma in the nearest-name match
SHADOW_ALLOWANCE = 6.0  # Lab L units of darkening (at backdrop chroma) not counted as foreground
FOREGROUND_DELTA_E = 10.0  # default distance above which a pixel is garment
# dominant_colours votes on point samples at most this many px on the long side: on 300 rendered photos
# decoded as the worker does (JPEG draft, 100-190 px), 128 named the same sets as 192 but one, for 3/4 of
# the pixels (bench.preprocess --part colour)
VOTE_SIDE = 128

_M_RGB2XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_c = np.arange(256) / 255.0
_LINEAR_LUT = np.where(_c <= 0.04045, _c / 12.92, ((_c + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, or float in [0, 255]) [..., 3] -> CIE Lab (D65) float32 [..., 3]."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        lin = _LINEAR_LUT[rgb]
    else:
        c = np.clip(rgb.astype(np.float64) / 255.0, 0.0, 1.0)
        lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (lin @ _M_RGB2XYZ.T) / _WHITE
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty(f.shape, dtype=np.float32)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


PALETTE_LAB = srgb_to_lab(np.array(list(PALETTE.values()), dtype=np.uint8))
_TABLES_LOCK = threading.Lock()
_LAB_LUT: np.ndarray | None = None  # Lab of every sRGB colour quantised to 6 bits a channel (3 MB, built on first use)


def srgb_to_lab_fast(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> Lab through a 64^3 lookup table: within 2 ΔE of :func:`srgb_to_lab` and
    four times faster; for the per-pixel maps of preprocessing, not for naming colours."""
    global _LAB_LUT
    if _LAB_LUT is None:
        with _TABLES_LOCK:  # decoder threads that arrive together build it once
            if _LAB_LUT is None:
                q = np.arange(64, dtype=np.uint8) * 4 + 2
                grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 3)
                _LAB_LUT = srgb_to_lab(grid)
    return np.take(_LAB_LUT, _cell(rgb), axis=0)


def _cell(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> the index of its 6-bit cell (r, g, b) in a 64**3 table (one np.take then
    reads the table: 2.4x faster than indexing with int32 shifts)."""
    q = np.asarray(rgb, dtype=np.uint8) >> 2
    idx = q[..., 0].astype(np.intp) * 4096
    idx += q[..., 1].astype(np.intp) * 64
    idx += q[..., 2]
    return idx


def _shaded_palette() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lab of every palette colour under each of :data:`SHADES` (linear-light factors), the colour index
    of each row and its penalty (ΔE) for being in shade."""
    lin = _LINEAR_LUT[np.array(list(PALETTE.values()), dtype=np.uint8)]
    rows, idx, pen = [], [], []
    for k, s in enumerate(SHADES):
        srgb = np.where(lin * s <= 0.0031308, 12.92 * lin * s, 1.055 * (lin * s) ** (1 / 2.4) - 0.055) * 255
        rows.append(srgb_to_lab(srgb))
        idx.append(np.arange(len(PALETTE)))
        pen.append(np.full(len(PALETTE), SHADE_PENALTY * k))
    return np.concatenate(rows), np.concatenate(idx), np.concatenate(pen).astype(np.float32)


SHADES = (1.0, 0.7, 0.5)  # a fold or the side away from the light: the same cloth, less light
SHADE_PENALTY = 5.0  # ΔE added per shade step, so an unshaded match wins a tie
_SHADED_LAB, _SHADED_IDX, _SHADED_PEN = _shaded_palette()


def nearest_colour_index(lab: np.ndarray, shading: bool = True) -> np.ndarray:
    """Lab [..., 3] -> index into :data:`NAMES` of the nearest palette colour (lightness down-weighted).

    With ``shading``, a pixel may also match a palette colour seen in shade (:data:`SHADES`), at a small
    penalty: a navy fold stays navy instead of black, an orange one stays orange instead of brown."""
    w = np.array([L_WEIGHT, 1.0, 1.0], dtype=np.float32)
    if not shading:
        d = (((lab[..., None, :] - PALETTE_LAB) * w) ** 2).sum(-1)
        return d.argmin(-1)
    d = np.sqrt((((lab[..., None, :] - _SHADED_LAB) * w) ** 2).sum(-1)) + _SHADED_PEN
    return _SHADED_IDX[d.argmin(-1)]


def colour_name(rgb) -> str:
    """The palette name nearest to one sRGB colour."""
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float64).reshape(1, 3))
    return NAMES[int(nearest_colour_index(lab, shading=False)[0])]


# --------------------------------------------------------------------------- backdrop


def _small(rgb: np.ndarray, max_side: int = 96) -> np.ndarray:
    """Box-downsample to at most ``max_side`` px on the long side (float32); cheap and alias-free enough."""
    h, w = rgb.shape[:2]
    k = max(1, int(np.ceil(max(h, w) / max_side)))
    if k == 1:
        return rgb.astype(np.float32)
    if k >= 4:  # sample every (k // 2)-th pixel first, then box-average 2x2: a quarter of the work
        s = k // 2
        rgb = rgb[::s, ::s]
        h, w = rgb.shape[:2]
        k = max(1, int(np.ceil(max(h, w) / max_side)))
        if k == 1:
            return rgb.astype(np.float32)
    hh, ww = h // k * k, w // k * k
    return rgb[:hh, :ww].astype(np.float32).reshape(hh // k, k, ww // k, k, -1).mean((1, 3))


def _design(h: int, w: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    y = ys / max(h - 1, 1) * 2 - 1
    x = xs / max(w - 1, 1) * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], -1)


_SMALL_SIDE = 96  # the backdrop is fitted at most this many px on the long side (_small)


@functools.lru_cache(maxsize=128)
def _band(h: int, w: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and design matrix of the border band of width ``b`` of an (h, w) picture, row-major;
    cached: the working sizes repeat (read-only arrays)."""
    sel = np.zeros((h, w), dtype=bool)
    sel[:b], sel[-b:], sel[:, :b], sel[:, -b:] = True, True, True, True
    ys, xs = np.nonzero(sel)
    a = _design(h, w, ys.astype(np.float64), xs.astype(np.float64))
    for arr in (ys, xs, a):
        arr.setflags(write=False)
    return ys, xs, a


def fit_backdrop(rgb: np.ndarray, band: float = 0.06) -> np.ndarray:
    """Coefficients [6, 3] of a quadratic backdrop surface, fitted to the border band of ``rgb`` (H, W, 3).

    Robust: two reweighting passes drop band pixels far from the fit (a garment or its shadow touching
    the border). Evaluate with :func:`backdrop_surface`."""
    rgb = np.asarray(rgb)
    small = max(rgb.shape[:2]) > _SMALL_SIDE
    img = _small(rgb, _SMALL_SIDE) if small else rgb  # (_small would only convert: read the band alone)
    h, w = img.shape[:2]
    ys, xs, a = _band(h, w, max(1, int(round(band * min(h, w)))))
    v = img[ys, xs, :3] if small else img[ys, xs, :3].astype(np.float32)
    v = v.astype(np.float64)
    keep = np.ones(len(v), dtype=bool)
    coef = np.zeros((6, 3), dtype=np.float64)
    for _ in range(3):
        if keep.sum() < 12:  # almost the whole border is foreground: a flat median is all we can say
            coef[:] = 0
            coef[0] = np.median(v, 0)
            break
        ak = a[keep]
        try:  # normal equations: a 6x6 solve instead of an SVD of the whole band
            coef = np.linalg.solve(ak.T @ ak + 1e-6 * np.eye(6), ak.T @ v[keep])
        except np.linalg.LinAlgError:
            coef[:] = 0
            coef[0] = np.median(v[keep], 0)
        res = np.abs(v - a @ coef).max(1)
        med = np.median(res[keep])
        keep = res <= max(4.0, 3.0 * 1.4826 * med + med)
    return coef


def backdrop_surface(rgb: np.ndarray, coef: np.ndarray | None = None) -> np.ndarray:
    """The fitted backdrop at every pixel of ``rgb``: float32 (H, W, 3) in [0, 255]."""
    coef = fit_backdrop(rgb) if coef is None else coef
    h, w = rgb.shape[:2]
    y = (np.arange(h, dtype=np.float32) / max(h - 1, 1) * 2 - 1)[:, None, None]
    x = (np.arange(w, dtype=np.float32) / max(w - 1, 1) * 2 - 1)[None, :, None]
    c = coef.astype(np.float32)
    out = c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * y * y + c[5] * x * y
    return np.clip(out, 0, 255)


def backdrop_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """The backdrop's typical colour: the median of the fitted surface along the border (uint8 RGB)."""
    surf = backdrop_surface(_small(rgb, 48), fit_backdrop(rgb))
    border = np.concatenate([surf[0], surf[-1], surf[:, 0], surf[:, -1]])
    return tuple(int(round(float(c))) for c in np.median(border, 0))


def backdrop_distance(rgb: np.ndarray, coef: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(distance, lab, backdrop_lab)``: :func:`distance_from_backdrop` with the two Lab maps it computed
    on the way (the lab-delta representation needs them too: computed once, not twice)."""
    rgb = np.asarray(rgb)[..., :3]
    coef = fit_backdrop(rgb) if coef is None else coef
    lab = srgb_to_lab_fast(rgb)
    bg = srgb_to_lab_fast(np.round(backdrop_surface(rgb, coef)).astype(np.uint8))
    d = lab - bg
    dl = d[..., 0]
    dl = np.where(dl < 0, np.minimum(dl + SHADOW_ALLOWANCE, 0.0), dl)
    return np.sqrt(dl * dl + d[..., 1] ** 2 + d[..., 2] ** 2), lab, bg


def distance_from_backdrop(rgb: np.ndarray, coef: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel perceptual distance (Lab, ΔE76-like) from the fitted backdrop: float32 (H, W).

    Darkening at the backdrop's own chroma (a soft shadow, a vignette the fit missed) is forgiven up to
    :data:`SHADOW_ALLOWANCE` L units."""
    return backdrop_distance(rgb, coef)[0]


def foreground_mask(rgb: np.ndarray, threshold: float = FOREGROUND_DELTA_E) -> np.ndarray:
    """Boolean (H, W): pixels that are not backdrop (distance above ``threshold``, see module doc)."""
    return distance_from_backdrop(rgb) > threshold


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:] &= mask[:-1]
    m[:-1] &= mask[1:]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


_NAME_LUT: np.ndarray | None = None  # palette index of every sRGB colour quantised to 6 bits a channel


def name_table() -> np.ndarray:
    """uint8 [64**3]: :func:`nearest_colour_index` (with shading) of the centre of every 6-bit sRGB cell.

    Built on first use (about half a second, in chunks: 262,144 colours x 45 shaded palette entries) and
    kept for the process: naming a garment's pixels is then one lookup each instead of 45 Lab distances
    (10 ms -> 0.1 ms for a 100x125 px photo). Quantising by 4 levels a channel moves a colour by at most
    2 levels, well inside a palette colour's region; measured on 300 rendered photos, the same names as the
    exact match for all but one."""
    global _NAME_LUT
    if _NAME_LUT is None:
        with _TABLES_LOCK:
            if _NAME_LUT is None:
                q = np.arange(64, dtype=np.uint8) * 4 + 2
                grid = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 3)
                lut = np.empty(len(grid), dtype=np.uint8)
                for s in range(0, len(grid), 8192):
                    lut[s : s + 8192] = nearest_colour_index(srgb_to_lab(grid[s : s + 8192]))
                _NAME_LUT = lut
    return _NAME_LUT


def warm_tables(names: bool = True) -> None:
    """Build the lookup tables now (about a second): a worker calls this while it loads a photo model, so
    that its first batch does not pay for them. The Lab table serves every photo preprocessing, the name
    table (``names``) only colour tagging."""
    srgb_to_lab_fast(np.zeros((1, 3), np.uint8))
    if names:
        name_table()


def colour_indices(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> index into :data:`NAMES` of each pixel's palette colour (through
    :func:`name_table`)."""
    return np.take(name_table(), _cell(rgb))


def dominant_colours(
    rgb: np.ndarray, max_colours: int = 2, mask: np.ndarray | None = None, min_share: float = 0.25,
    coef: np.ndarray | None = None,
) -> list[tuple[str, float]]:
    """The garment's dominant palette colours, largest share first: ``[(name, share), ...]``.

    Shares are of the garment's pixels (its foreground, eroded by one pixel so the anti-aliased rim
    that mixes garment and backdrop does not vote). A second colour is reported only when it covers at
    least ``min_share``: shading and seams give every garment a few pixels of some other name.
    ``coef``: a backdrop fit already made (:func:`fit_backdrop`, on this picture at any resolution: the
    surface is in normalised coordinates), so the foreground is found without fitting again.
    Returns ``[]`` when there is no foreground."""
    rgb = np.asarray(rgb)[..., :3]
    # Vote on point samples, not averages: averaging the blue and yellow squares of a fine check makes
    # green. The backdrop is still fitted on averages (robust to noise and JPEG ringing).
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / VOTE_SIDE)))
    pts = rgb[::step, ::step]
    if mask is None:
        mask = distance_from_backdrop(pts, fit_backdrop(pts) if coef is None else coef) > FOREGROUND_DELTA_E
    else:
        mask = np.asarray(mask, dtype=bool)[::step, ::step]
    inner = _erode(mask)
    if inner.sum() >= 16:
        mask = inner
    if not mask.any():
        return []
    idx = colour_indices(np.ascontiguousarray(pts)[mask])
    counts = np.bincount(idx, minlength=len(NAMES)).astype(np.float64)
    shares = counts / counts.sum()
    order = np.argsort(-shares, kind="stable")
    out = [(NAMES[order[0]], float(shares[order[0]]))]
    for k in order[1:max_colours]:
        if shares[k] >= min_share:
            out.append((NAMES[k], float(shares[k])))
    return out
