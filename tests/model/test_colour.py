"""model.colour: the palette, Lab, the backdrop fit, the garment's foreground and its dominant colours."""

import numpy as np
import pytest

from model.colour import (
    NAMES,
    PALETTE,
    backdrop_colour,
    colour_name,
    dominant_colours,
    fit_backdrop,
    foreground_mask,
    srgb_to_lab,
    srgb_to_lab_fast,
)
from model.fmnist import load_split
from model.render import render_photo


def _studio(h=300, w=400, base=(236, 232, 220), gradient=0.08, vignette=0.1):
    """A graded, vignetted light backdrop (float32)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = yy / (h - 1) * 2 - 1, xx / (w - 1) * 2 - 1
    field = 1 + gradient * (x + y) / 2 - vignette * (x * x + y * y) / 2
    return np.asarray(base, np.float32) * field[..., None]


def test_palette_is_named_and_each_colour_maps_to_itself():
    assert 12 <= len(PALETTE) <= 16 and len(set(NAMES)) == len(NAMES)
    for name, rgb in PALETTE.items():
        assert colour_name(rgb) == name
        assert colour_name(np.asarray(rgb) * 0.9) == name, f"{name} shaded by 10 % changes its name"


def test_lab_reference_points_and_fast_table():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    assert lab[0] == pytest.approx([100, 0, 0], abs=0.1)
    assert lab[1] == pytest.approx([0, 0, 0], abs=0.1)
    assert lab[2] == pytest.approx([53.24, 80.09, 67.20], abs=0.1)  # the textbook sRGB red
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3), dtype=np.uint8)
    assert np.abs(srgb_to_lab_fast(rgb) - srgb_to_lab(rgb)).max() < 2.5


def test_backdrop_fit_ignores_a_garment_touching_the_border():
    img = _studio()
    img[100:300, 150:260] = (30, 40, 90)  # a navy garment running off the bottom edge
    coef = fit_backdrop(img.astype(np.uint8))
    centre = coef[0]  # the surface at (x, y) = (0, 0), the centre
    want = _studio()[150, 200]
    assert np.abs(centre - want).max() < 4, (centre, want)
    clean = _studio()
    border = np.concatenate([clean[0], clean[-1], clean[:, 0], clean[:, -1]])
    assert np.abs(np.array(backdrop_colour(img.astype(np.uint8))) - np.median(border, 0)).max() < 4


def test_foreground_mask_finds_the_garment_not_the_shadow_or_the_vignette():
    img = _studio()
    shadow = np.zeros(img.shape[:2], np.float32)
    shadow[110:250, 170:290] = 0.12  # a soft 12 % drop shadow, offset from the garment
    img *= (1 - shadow)[..., None]
    img[100:240, 160:280] = (200, 30, 40)
    mask = foreground_mask(img.astype(np.uint8))
    truth = np.zeros_like(mask)
    truth[100:240, 160:280] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95, iou
    assert not mask[:20].any() and not mask[:, :20].any()  # vignette corners stay backdrop


def test_dominant_colours_of_plain_and_striped_cloth():
    img = _studio().astype(np.uint8)
    img[60:240, 120:280] = PALETTE["red"]
    assert dominant_colours(img) == [("red", pytest.approx(1.0, abs=0.02))]
    stripes = _studio().astype(np.uint8)
    band = (np.arange(160) // 8) % 2 == 0
    stripes[60:240, 120:280] = np.where(band[None, :, None], PALETTE["navy"], PALETTE["yellow"])
    got = dominant_colours(stripes)
    assert {n for n, _ in got} == {"navy", "yellow"}
    assert all(0.4 < s < 0.6 for _, s in got)
    pin = _studio().astype(np.uint8)
    thin = (np.arange(160) % 16) < 2  # 12 % pinstripes: one colour
    pin[60:240, 120:280] = np.where(thin[None, :, None], PALETTE["white"], PALETTE["green"])
    assert [n for n, _ in dominant_colours(pin)] == ["green"]


@pytest.mark.usefixtures("fmnist")
def test_colour_of_rendered_garments_is_recovered():
    images, _ = load_split("test")
    rng = np.random.default_rng(7)
    hits = plain = 0
    pairs = pair_hits = 0
    for i in range(60):
        p = render_photo(images[i], rng)
        got = [n for n, _ in dominant_colours(np.asarray(p.image))]
        if len(p.colours) == 1:
            plain += 1
            hits += bool(got) and got[0] == p.colours[0]
        else:
            pairs += 1
            pair_hits += set(got) == set(p.colours)
    assert plain >= 20 and hits / plain >= 0.85, (hits, plain)
    if pairs >= 5:
        assert pair_hits / pairs >= 0.6, (pair_hits, pairs)
