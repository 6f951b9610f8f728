"""model.predictor serving a photo checkpoint: the preprocessing, normalisation and input size come from
the checkpoint's spec; served scores are temperature-scaled; the review score and out-of-distribution flag
are model.calibration's (review_score kind, ood_threshold, frame_rule on the uint8 input); old checkpoints
behave as before; malformed serving metadata is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import calibration as cal
from model.errors import CheckpointError
from model.predictor import ColourTagging, Predictor
from model.preprocess import PreprocessSpec, to_tensor
from tests.support.photo_model import PHOTO_SPEC, photo_checkpoint


def _batch(n: int, spec: PreprocessSpec = PHOTO_SPEC, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, spec.input_size, spec.input_size, spec.channels), dtype=np.uint8)


def test_input_tensor_is_the_specs_normalisation(tmp_path):
    spec = PreprocessSpec(channels=3, input_size=32, fit="pad", representation="as-is", mean=(0.1, 0.4, 0.7),
                          std=(0.2, 0.3, 0.5))
    photo_checkpoint(tmp_path / "m.safetensors", spec=spec)
    p = Predictor.from_checkpoint(tmp_path / "m.safetensors", device="cpu")
    assert p.spec == spec and (p.input_size, p.channels) == (32, 3)
    x = _batch(5, spec)
    got = p.input_tensor(x)
    want = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.mean).view(1, 3, 1, 1)) \
        / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert got.shape == (5, 3, 32, 32) and torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got, to_tensor(x, spec, channels_last=True))  # the one function training calls too
    with torch.inference_mode():  # and it is what the network is fed: the predictor's scores follow from it
        c, f = p.model(got)
    fine = torch.softmax(torch.log_softmax(f, 1) + torch.log_softmax(c, 1)[:, [q[0] for q in p.taxonomy.parents]], 1)
    assert np.allclose(p.predict_arrays(x)["fine_scores"], fine.numpy(), atol=1e-5)


def _logits(p: Predictor, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The network's raw logits for ``x``, computed here (not by the predictor's own path)."""
    with torch.inference_mode():
        c, f = p.model(to_tensor(x, p.spec, channels_last=True))
    return c.numpy().astype(np.float64), f.numpy().astype(np.float64)


def test_served_and_review_scores_are_calibrations(tmp_path, fm_tax):
    """Temperatures divide the logits before the consistent decoding (the served scores are calibrated);
    review_score is model.calibration.review_score of the checkpoint's kind: msp, and a squashed energy."""
    temps = {"coarse": 1.7, "fine": 0.6}
    photo_checkpoint(tmp_path / "m.safetensors", temperature=temps, review_threshold=0.5)
    p = Predictor.from_checkpoint(tmp_path / "m.safetensors", device="cpu")
    x = _batch(40)
    c, f = _logits(p, x)
    parent = np.array([q[0] for q in fm_tax.parents])
    joint = cal.joint_fine_probs(c, f, parent, t_coarse=1.7, t_fine=0.6)
    a = p.predict_arrays(x)
    assert np.allclose(a["fine_scores"], joint, atol=1e-5) and np.array_equal(a["primary_fine"], joint.argmax(1))
    assert np.allclose(a["review_score"], joint.max(1), atol=1e-5)
    assert np.allclose(a["review_score"], cal.review_score(c, f, p.meta), atol=1e-6)
    assert not np.allclose(joint.max(1), cal.joint_fine_probs(c, f, parent).max(1), atol=1e-3)  # T matters
    assert not a["out_of_distribution"].any()  # no ood_threshold, no frame_rule

    raw = cal.review_scores(f, "energy", t_fine=0.6)
    centre, scale = float(np.quantile(raw, 0.2)), float(raw.std() / 2)
    cut = 0.5
    photo_checkpoint(tmp_path / "e.safetensors", temperature=temps, ood_threshold=cut,
                     review_score={"kind": "energy", "center": centre, "scale": scale})
    q = Predictor.from_checkpoint(tmp_path / "e.safetensors", device="cpu")
    want = 1 / (1 + np.exp(-(raw - centre) / scale))
    preds = q.predict(x)
    assert [pr.review_score for pr in preds] == pytest.approx(want.tolist(), abs=1e-5)
    got = np.array([pr.out_of_distribution for pr in preds])
    assert np.array_equal(got, want < cut) and 0 < got.sum() < 40


def test_frame_rule_reads_the_uint8_input(tmp_path):
    """The checkpoint's frame_rule (model.calibration.frame_flags) on the model input: channel 0 is the
    distance from the backdrop; no foreground, or foreground all along the border -> out of distribution."""
    rule = {"level": 64, "min_foreground": 0.02, "max_border": 0.6}
    photo_checkpoint(tmp_path / "f.safetensors", frame_rule=rule)  # no temperature: no review score
    p = Predictor.from_checkpoint(tmp_path / "f.safetensors", device="cpu")
    x = np.zeros((4, 28, 28, 3), np.uint8)
    x[..., 1:] = 128
    x[1, 6:22, 8:20, 0] = 200  # a garment in the middle
    x[2, :, :, 0] = 255  # all foreground, border included
    x[3, 13, 13, 0] = 255  # one stray pixel
    a = p.predict_arrays(x)
    assert a["review_score"] is None and a["out_of_distribution"].tolist() == [True, False, True, True]
    assert p.frame_rule == rule


def test_multi_label_review_score_is_the_best_scaled_sigmoid(tmp_path, ml_tax):
    photo_checkpoint(tmp_path / "m.safetensors", taxonomy=ml_tax, temperature=2.0)
    p = Predictor.from_checkpoint(tmp_path / "m.safetensors", device="cpu")
    x = _batch(8)
    _, f = _logits(p, x)
    a = p.predict_arrays(x)
    assert np.allclose(a["review_score"], (1 / (1 + np.exp(-f / 2.0))).max(1), atol=1e-6)
    assert np.allclose(a["fine_scores"], 1 / (1 + np.exp(-f / 2.0)), atol=1e-6)  # served: scaled too


def test_checkpoints_without_review_keys_serve_as_before(tmp_path):
    photo_checkpoint(tmp_path / "old.safetensors", spec=None)  # metadata written before 'preprocess' existed
    old = Predictor.from_checkpoint(tmp_path / "old.safetensors", device="cpu")
    assert old.spec.is_legacy and (old.spec.mean, old.spec.std) == ((0.286,), (0.353,))
    assert (old.temperature, old.frame_rule, old.colours, old.review_threshold) == (None, None, None, None)
    x = _batch(4, old.spec)
    preds = old.predict(x)
    assert all(pr.review_score is None and not pr.out_of_distribution for pr in preds)
    c, f = _logits(old, x)
    parent = np.array([q[0] for q in old.taxonomy.parents])
    assert np.allclose(old.predict_arrays(x)["fine_scores"], cal.joint_fine_probs(c, f, parent), atol=1e-5)
    photo_checkpoint(tmp_path / "new.safetensors")
    new = Predictor.from_checkpoint(tmp_path / "new.safetensors", device="cpu")
    assert new.colours == ColourTagging()  # a photo spec names colours by default, with model.colour's palette
    assert all(pr.review_score is None and not pr.out_of_distribution for pr in new.predict(_batch(3)))
    photo_checkpoint(tmp_path / "off.safetensors", colour=False)
    assert Predictor.from_checkpoint(tmp_path / "off.safetensors", device="cpu").colours is None
    photo_checkpoint(tmp_path / "some.safetensors", colour={"palette": ["navy", "red"], "max_colours": 1})
    some = Predictor.from_checkpoint(tmp_path / "some.safetensors", device="cpu")
    assert some.colours == ColourTagging(("navy", "red"), 1, 0.25)


@pytest.mark.parametrize(("extra", "message"), [
    ({"colour": {"palette": ["navy", "teal"]}}, "colour palette names ['teal']"),
    ({"colour": {"max_colours": 5}}, "max_colours must be 1-3"),
    ({"colour": "yes"}, "'colour' must be an object or false"),
    ({"temperature": -1}, "'temperature' must be a positive number"),
    ({"temperature": {"fine": "hot"}}, "'temperature' must be a positive number"),
    ({"ood_threshold": "low"}, "'ood_threshold' must be a number"),
    ({"review_score": {"kind": "vibes"}}, "'review_score' kind must be one of"),
    ({"review_score": {"kind": "energy"}}, "malformed review metadata"),
    ({"frame_rule": {"min_foreground": 0.1}}, "malformed review metadata"),
    ({"preprocess": {**PHOTO_SPEC.to_dict(), "input_size": 32}}, "says 3 channels at 32 px, the network was built"),
    ({"preprocess": {**PHOTO_SPEC.to_dict(), "fit": "zoom"}}, "bad preprocessing in metadata"),
])
def test_malformed_serving_metadata_is_refused_in_one_line(tmp_path, extra, message):
    photo_checkpoint(tmp_path / "bad.safetensors", **extra)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        Predictor.from_checkpoint(tmp_path / "bad.safetensors", device="cpu")
    assert "\n" not in str(info.value)


def test_colour_tags_need_a_photo_spec(tmp_path):
    photo_checkpoint(tmp_path / "bad.safetensors", spec=None, colour={"max_colours": 2})
    with pytest.raises(CheckpointError, match="colour tags need a photo preprocessing"):
        Predictor.from_checkpoint(tmp_path / "bad.safetensors", device="cpu")
