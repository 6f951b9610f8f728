"""The shipped checkpoint, measured against real Fashion-MNIST test images."""

import json

import pytest

from model.checkpoint import load_checkpoint
from model.cli import eval_cmd
from model.data import fmnist_dataset
from model.evaluate import collect_logits, compute_metrics
from model.predictor import Predictor
from model.weights import DEFAULT_CHECKPOINT, WIDE_CHECKPOINT

shipped = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(),
                             reason=f"shipped checkpoint {DEFAULT_CHECKPOINT.name} not trained yet")


# (checkpoint, backbone, fine top-1, coarse top-1 recorded on the full 10,000-image test split)
SHIPPED = [(DEFAULT_CHECKPOINT, "resnet-small", 0.9525, 0.9798), (WIDE_CHECKPOINT, "resnet-wide", 0.9553, 0.9818)]


@shipped
@pytest.mark.parametrize(("path", "backbone", "fine", "coarse"), SHIPPED, ids=["default", "wide"])
def test_shipped_metadata_and_size(path, backbone, fine, coarse):
    assert path.stat().st_size <= 25 * 1024 * 1024
    _, meta = load_checkpoint(path)
    assert meta["command"].startswith("styletag train") and f"--backbone {backbone}" in meta["command"]
    assert meta["taxonomy"]["name"] == "fashion-mnist" and meta["backbone"] == backbone
    # Trained on an H100 (docs/model.md): both pass the fine floor (93.5%), the wide one its 95.5%
    # goal; neither reaches the 98.5% coarse target. These pin the recorded figures.
    assert meta["metrics"]["fine_top1"] == pytest.approx(fine, abs=1e-4)
    assert meta["metrics"]["coarse_top1"] == pytest.approx(coarse, abs=1e-4)
    assert meta["metrics"]["fine_top1"] >= 0.935
    assert meta["metrics"]["consistency"] == 1.0 and meta["metrics"]["n"] == 10_000


@shipped
@pytest.mark.usefixtures("fmnist")
def test_shipped_accuracy_first_2000_test_images():
    p = Predictor.from_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    test = fmnist_dataset("test", p.taxonomy, limit=2000)
    out = p.predict_arrays(test.images)
    fine = float((out["primary_fine"] == test.fine).mean())
    coarse = float((out["primary_coarse"] == test.coarse).mean())
    assert fine >= 0.95, fine  # measured 0.9555 on these 2,000 images
    assert coarse >= 0.975, coarse  # measured 0.9805
    # the predictor and the evaluation code agree
    m = compute_metrics(p.taxonomy, collect_logits(p.model, test, mean=p.meta["mean"], std=p.meta["std"],
                                                   input_size=p.input_size))
    assert m["fine_top1"] == pytest.approx(fine, abs=1e-3) and m["consistency"] == 1.0


@shipped
@pytest.mark.usefixtures("fmnist")
def test_eval_cli_json(tmp_path):
    from click.testing import CliRunner

    res = CliRunner().invoke(eval_cmd, ["--checkpoint", str(DEFAULT_CHECKPOINT), "--limit", "500", "--json",
                                        "--plots", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["n"] == 500 and out["fine_top1"] > 0.93 and out["consistency"] == 1.0
    assert (tmp_path / "confusion-fine.png").is_file() and (tmp_path / "confusion-coarse.png").is_file()


@pytest.mark.skipif(not WIDE_CHECKPOINT.is_file(), reason="wide checkpoint not shipped")
@pytest.mark.usefixtures("fmnist")
def test_wide_checkpoint_predicts_like_its_metadata():
    p = Predictor.from_checkpoint(WIDE_CHECKPOINT, device="cpu")
    test = fmnist_dataset("test", p.taxonomy, limit=1000)
    out = p.predict_arrays(test.images)
    assert float((out["primary_fine"] == test.fine).mean()) >= 0.94
    assert float((out["primary_coarse"] == test.coarse).mean()) >= 0.97
