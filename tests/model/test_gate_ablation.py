"""The gate ablated (``build_model(..., gate=False)``, ``styletag train --no-gate``): recorded in the checkpoint
as ``"gate": false`` and honoured at load; a checkpoint without the key (every one before it) keeps its gate
and its model_version."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from model.net import Gate, build_model
from model.predictor import Predictor, load_model
from model.train import TrainConfig, base_meta
from model.weights import DEFAULT_CHECKPOINT
from worker.cli import cli

SHIPPED_SMALL = "5186c090c00e9b02"  # tests/model/test_checkpoint.py, tests/worker/test_lifecycle_worker.py


def _save(path, tax, gate: bool, **extra) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(3)
    model = build_model("resnet-tiny", len(tax.coarse.labels), len(tax.fine.labels), channels=1, gate=gate).eval()
    meta = base_meta(TrainConfig(backbone="resnet-tiny", gate=gate), tax)
    meta.update(trained_at="2025-01-02T03:04:05+00:00", command="tests", **extra)
    return model, save_checkpoint(path, model, meta)


def test_build_without_gate_same_names_otherwise():
    gated = build_model("resnet-tiny", 6, 10, channels=1)
    plain = build_model("resnet-tiny", 6, 10, channels=1, gate=False)
    assert isinstance(gated.gate, Gate) and plain.gate is None
    names = set(plain.state_dict())
    assert not any(k.startswith("gate.") for k in names)
    assert names == {k for k in gated.state_dict() if not k.startswith("gate.")}
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        plain.eval()
        c, f = plain(x)
        feats = plain.backbone(x)
        assert torch.allclose(f, plain.fine_head(feats), atol=1e-6)  # fine = Linear(f), directly
        assert torch.allclose(c, plain.coarse_head(feats), atol=1e-6)


def test_gated_metadata_has_no_gate_key(fm_tax):
    """Absent means gated: a gated checkpoint's prediction metadata (and so its model_version) is as before."""
    assert "gate" not in base_meta(TrainConfig(), fm_tax)
    assert base_meta(TrainConfig(gate=False), fm_tax)["gate"] is False


def test_no_gate_checkpoint_loads_without_gate(fm_tax, tmp_path):
    path = tmp_path / "nogate.safetensors"
    model, version = _save(path, fm_tax, gate=False)
    assert read_metadata(path)["gate"] is False
    state, meta = load_checkpoint(path)
    assert meta["gate"] is False and not any(k.startswith("gate.") for k in state)
    p = Predictor.from_checkpoint(path, device="cpu")
    assert p.model_version == version and p.meta["gate"] is False
    assert p.model.gate is None and not any(k.startswith("gate.") for k in p.model.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(model(x), p.model(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)  # (the predictor may run channels-last)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    assert len(p.predict(images)) == 5


def test_gate_key_is_part_of_the_version(fm_tax, tmp_path):
    """The same gated weights under "gate": false are another model, and do not load into a gateless net."""
    _, gated = _save(tmp_path / "a.safetensors", fm_tax, gate=True)
    bad = tmp_path / "b.safetensors"
    model, _ = _save(tmp_path / "c.safetensors", fm_tax, gate=True)
    meta = {**base_meta(TrainConfig(backbone="resnet-tiny"), fm_tax), "gate": False, "trained_at": "2025-01-02"}
    assert save_checkpoint(bad, model, meta) != gated
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(bad, "cpu")
    odd = tmp_path / "d.safetensors"
    save_checkpoint(odd, model, {**meta, "gate": "no"})
    with pytest.raises(CheckpointError, match="'gate' must be true or false"):
        load_model(odd, "cpu")


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="shipped checkpoint not trained yet")
def test_shipped_checkpoint_keeps_its_gate_and_version():
    meta = read_metadata(DEFAULT_CHECKPOINT)
    assert "gate" not in meta and meta["model_version"] == SHIPPED_SMALL
    p = Predictor.from_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    assert p.model_version == SHIPPED_SMALL and isinstance(p.model.gate, Gate)


@pytest.mark.usefixtures("fmnist")
def test_train_no_gate_cli(tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["train", "--backbone", "resnet-tiny", "--epochs", "1", "--limit", "256", "--batch-size", "64",
            "--val-limit", "100", "--no-progress", "--out", str(out)]
    r = CliRunner().invoke(cli, [*args, "--no-gate"])
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["gate"] is False and meta["config"]["gate"] is False
    state, _ = load_checkpoint(out)
    assert not any(k.startswith("gate.") for k in state)
    p = Predictor.from_checkpoint(out, device="cpu")
    assert p.model.gate is None and p.model_version == meta["model_version"]
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(out), "--limit", "200", "--decoding", "independent",
                                 "--json"])
    assert r.exit_code == 0, r.output
    # resuming a gateless run as a gated one is refused in one line, before any training
    r = CliRunner().invoke(cli, [*args[:4], "2", *args[5:], "--resume", str(out)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "trained without the gate; pass --no-gate" in r.output
