"""The shipped photo checkpoint (model/weights/fmnist-photo.safetensors), measured here on photos rendered
from the Fashion-MNIST *test* split exactly as `styletag import fashion-mnist --render photo` renders them,
decoded by the one preprocessing the worker uses. A retrained or damaged checkpoint fails: the figures are
measured, not read from its metadata."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catalog.importers.photos import render_jpeg
from model.checkpoint import load_checkpoint
from model.fmnist import CLASSES, load_split
from model.predictor import Predictor
from model.preprocess import decode
from model.weights import PHOTO_CHECKPOINT

MAX_PIXELS = 40_000_000
N = 400  # items 0..399 of the test split (the checkpoint never saw the test split)


@pytest.fixture(scope="module")
def photo_model() -> Predictor:
    return Predictor.from_checkpoint(PHOTO_CHECKPOINT, device="cpu")


def test_metadata_records_how_it_was_made(photo_model):
    _, meta = load_checkpoint(PHOTO_CHECKPOINT)
    # trained, then its score map fitted on the same catalog's validation split (styletag calibrate)
    assert meta["command"].startswith("styletag calibrate --from-catalog --checkpoint")
    assert meta["parent"]["command"].startswith("styletag train --from-catalog --taxonomy fashion-mnist")
    assert meta["metrics"]["score_map_fit"]["split"] == "val" and meta["metrics"]["score_map_fit"]["n"] > 6000
    assert photo_model.score_map is not None
    assert meta["data"]["split"]["test_match"] == "fmnist-photo-test-*"  # the rendered test split held out
    assert meta["data"]["counts"]["test"] == 10_000 and meta["data"]["train_items"] > 50_000
    assert photo_model.spec.representation == "lab-delta" and photo_model.spec.foreground_crop
    assert photo_model.temperature is not None and photo_model.review_threshold is not None
    assert photo_model.colours is not None  # names garment colours (level colour)


@pytest.mark.usefixtures("fmnist")
def test_rendered_test_photos_are_tagged_and_blank_pictures_are_held(photo_model):
    images, labels = load_split("test")
    tax = photo_model.taxonomy
    batch, colours_true = [], []
    for i in range(N):
        data, colours = render_jpeg(images[i], "test", i)
        d = decode(data, photo_model.spec, MAX_PIXELS, colours=True)
        batch.append(d.array)
        colours_true.append((colours, d.colours))
    preds = photo_model.predict(np.stack(batch))
    fine_true = np.array([tax.fine.labels.index(CLASSES[k]) for k in labels[:N]])
    fine = np.array([p.primary_fine for p in preds])
    acc = float((fine == fine_true).mean())
    assert acc >= 0.84, acc  # 0.882 on these 400; docs/model.md: 88-89 % on the 10,000 (a 400-item sample: about +-3 points)
    coarse_ok = all(p.primary_coarse == tax.parents[p.primary_fine][0] for p in preds)
    assert coarse_ok  # hierarchy-consistent
    primary_colour = np.mean([bool(got) and got[0][0] == true[0] for true, got in colours_true])
    assert primary_colour >= 0.85, primary_colour  # 0.935 measured
    held = np.mean([p.out_of_distribution or p.review_score < photo_model.review_threshold for p in preds])
    assert held <= 0.10, held  # garments held for review: 3.5 % of these 400

    def photo(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    junk = [np.full((800, 600, 3), 255, np.uint8),  # a blank white image (the old model: "dress" at 0.99)
            np.full((800, 600, 3), 235, np.uint8),
            rng.integers(0, 256, (800, 600, 3), dtype=np.uint8)]  # noise (the old model: "ankle boot")
    arrays = np.stack([decode(photo(a), photo_model.spec, MAX_PIXELS).array for a in junk])
    assert all(p.out_of_distribution for p in photo_model.predict(arrays))
