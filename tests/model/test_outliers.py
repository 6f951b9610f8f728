"""model.outliers: generated non-garment images."""

import numpy as np
import pytest

from model.colour import foreground_mask
from model.outliers import FAMILIES, HELD_OUT_FAMILIES, TRAIN_FAMILIES, render_outlier


def test_families_split_into_train_and_held_out():
    assert not set(TRAIN_FAMILIES) & set(HELD_OUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELD_OUT_FAMILIES) == set(FAMILIES)
    assert len(TRAIN_FAMILIES) >= 6 and len(HELD_OUT_FAMILIES) >= 4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_renders_photo_sized_rgb_deterministically(family):
    a = render_outlier(np.random.default_rng(11), family)
    b = render_outlier(np.random.default_rng(11), family)
    w, h = a.image.size
    assert a.family == family and a.image.mode == "RGB" and 600 <= w <= 1000 and 600 <= h <= 1000
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_default_draws_only_training_families():
    rng = np.random.default_rng(0)
    seen = {render_outlier(rng).family for _ in range(60)}
    assert seen <= set(TRAIN_FAMILIES) and len(seen) >= 6
    held = {render_outlier(rng, families=HELD_OUT_FAMILIES).family for _ in range(30)}
    assert held <= set(HELD_OUT_FAMILIES)


def test_families_look_like_what_they_say():
    rng = np.random.default_rng(2)
    blank = np.asarray(render_outlier(rng, "blank").image)
    assert foreground_mask(blank).mean() < 0.01  # an empty studio shot has no foreground
    noise = np.asarray(render_outlier(rng, "noise-uniform").image).astype(np.float32)
    assert noise.std() > 50
    solid = np.asarray(render_outlier(rng, "solid").image)
    assert (solid == solid[0, 0]).all()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown outlier family"):
        render_outlier(np.random.default_rng(0), "kittens")
