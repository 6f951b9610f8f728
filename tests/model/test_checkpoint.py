import json
import pickle
import struct

import numpy as np
import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer,
    read_metadata,
    save_checkpoint,
    save_optimizer,
)
from model.net import build_model
from model.predictor import Prediction, Predictor
from model.train import TrainConfig, base_meta


@pytest.fixture
def tiny(fm_tax, tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet-tiny", 6, 10, channels=1).eval()
    meta = base_meta(TrainConfig(backbone="resnet-tiny"), fm_tax)
    meta.update(trained_at="2025-01-02T03:04:05+00:00", command="styletag train --epochs 1", data={"dataset": "x"},
                metrics={"fine_top1": 0.5})
    path = tmp_path / "m.safetensors"
    version = save_checkpoint(path, model, meta)
    return model, meta, path, version


def test_round_trip_same_outputs_and_metadata(tiny, fm_tax):
    model, meta, path, version = tiny
    state, got = load_checkpoint(path)
    assert got["model_version"] == version and len(version) == 16
    for key in ("backbone", "input_size", "channels", "mean", "std", "command", "data", "metrics", "trained_at"):
        assert got[key] == meta[key]
    assert got["taxonomy"] == fm_tax.to_dict()
    again = build_model("resnet-tiny", 6, 10, channels=1).eval()
    again.load_state_dict(state)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(model(x), again(x), strict=True):
            assert torch.equal(a, b)
    assert read_metadata(path)["model_version"] == version


def test_same_weights_same_version(tiny, tmp_path):
    model, meta, _, version = tiny
    assert save_checkpoint(tmp_path / "b.safetensors", model, {**meta, "command": "other"}) == version


def test_pickle_files_refused(tmp_path, tiny):
    model = tiny[0]
    torch_file = tmp_path / "model.pt"
    torch.save(model.state_dict(), torch_file)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(torch_file)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(raw)


def test_tampered_weights_refused(tiny):
    _, _, path, version = tiny
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # a byte of the last tensor
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"recorded model_version {version}"):
        load_checkpoint(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "\n" not in str(info.value)


def test_optimizer_state_round_trip(tiny, tmp_path):
    model, _, path, _ = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 28, 28))[1].sum().backward()
    opt.step()
    save_optimizer(path, opt)
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    assert load_optimizer(path, opt2)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == pytest.approx(1e-3)
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_predictor_api(tiny, fm_tax):
    model, _, path, version = tiny
    p = Predictor.from_checkpoint(path, device="cpu", batch_size=3)
    assert p.model_version == version and p.trained_at.tzinfo is not None
    assert (p.input_size, p.channels, p.backbone) == (28, 1, "resnet-tiny")
    assert p.taxonomy == fm_tax
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    preds = p.predict(imgs)
    assert len(preds) == 7 and all(isinstance(x, Prediction) for x in preds)
    for pr in preds:
        assert fm_tax.parents[pr.primary_fine] == (pr.primary_coarse,)
        assert pr.primary_fine in [i for i, _ in pr.fine_tags]
        assert pr.primary_coarse in [i for i, _ in pr.coarse_tags]
        assert abs(sum(pr.fine_scores) - 1) < 1e-4 and len(pr.coarse_scores) == 6
        for f, _ in pr.fine_tags:  # a tagged fine label always brings its parent
            assert fm_tax.parents[f][0] in [c for c, _ in pr.coarse_tags]
    # list input, torch input and predict_arrays agree; batch splitting does not change results
    as_list = p.predict(list(imgs))
    as_torch = p.predict(torch.from_numpy(imgs))
    assert [x.primary_fine for x in as_list] == [x.primary_fine for x in preds] == [x.primary_fine for x in as_torch]
    arrays = p.predict_arrays(imgs)
    assert np.allclose(arrays["fine_scores"], np.array([x.fine_scores for x in preds]), atol=1e-5)
    assert p.predict(np.zeros((0, 28, 28, 1), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        p.predict(imgs.astype(np.float32))


def test_metadata_is_json(tiny):
    meta = read_metadata(tiny[2])
    json.dumps(meta)
    assert meta["format"] == "styletag-checkpoint/2"


def test_version_covers_the_metadata_that_changes_predictions(tiny, tmp_path):
    """Format 2: the same weights with other thresholds, preprocessing, taxonomy or review threshold are
    another model; bookkeeping (command, metrics, trained_at) is not part of the version."""
    model, meta, _, version = tiny
    changed = {
        "thresholds": {"coarse": 0.4, "fine": 0.5},
        "mean": [0.3],
        "review_threshold": 0.6,
        "temperature": 1.5,
        "preprocess": {"fit": "crop"},
        "taxonomy": {**meta["taxonomy"], "name": "other-name"},
    }
    seen = {version}
    for key, value in changed.items():
        v = save_checkpoint(tmp_path / f"{key}.safetensors", model, {**meta, key: value})
        assert v not in seen, key
        seen.add(v)
    same = {"command": "x", "metrics": {"fine_top1": 0.9}, "trained_at": "2030-01-01T00:00:00+00:00", "notes": "n"}
    assert save_checkpoint(tmp_path / "same.safetensors", model, {**meta, **same}) == version


def test_tampered_metadata_refused(tiny):
    """Editing a threshold in the header (and keeping the recorded version) is caught like a weights edit."""
    _, _, path, version = tiny
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    inner = json.loads(header["__metadata__"]["styletag"])
    inner["thresholds"] = {"coarse": 0.1, "fine": 0.1}
    header["__metadata__"]["styletag"] = json.dumps(inner, sort_keys=True)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])
    assert read_metadata(path)["model_version"] == version
    with pytest.raises(CheckpointError, match=f"hash of weights and metadata .* != recorded model_version {version}"):
        load_checkpoint(path)


def test_format_1_checkpoints_still_load(fm_tax):
    """The shipped checkpoints were saved before format 2: their version covers the weights only."""
    from model.metadata import is_legacy
    from model.weights import DEFAULT_CHECKPOINT

    state, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert is_legacy(meta) and meta["model_version"] == "5186c090c00e9b02"
