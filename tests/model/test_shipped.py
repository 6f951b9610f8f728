"""The shipped checkpoint, measured against real Fashion-MNIST test images."""

import json

import pytest

from model.checkpoint import load_checkpoint
from model.cli import eval_cmd
from model.data import fmnist_dataset
from model.evaluate import collect_logits, compute_metrics
from model.predictor import Predictor
from model.weights import DEFAULT_CHECKPOINT

shipped = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(),
                             reason=f"shipped checkpoint {DEFAULT_CHECKPOINT.name} not trained yet")


@shipped
def test_shipped_metadata_and_size():
    assert DEFAULT_CHECKPOINT.stat().st_size <= 25 * 1024 * 1024
    _, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert meta["command"].startswith("styletag train")
    assert meta["taxonomy"]["name"] == "fashion-mnist"
    # The shipped CPU-trained model records fine 93.41% / coarse 96.99% on the full test split; the issue's
    # targets (93.5% / 98.5%) are not met yet (see docs/model.md). These bounds pin what was shipped.
    assert meta["metrics"]["fine_top1"] >= 0.93 and meta["metrics"]["coarse_top1"] >= 0.965
    assert meta["metrics"]["consistency"] == 1.0 and meta["metrics"]["n"] == 10_000


@shipped
@pytest.mark.usefixtures("fmnist")
def test_shipped_accuracy_first_2000_test_images():
    p = Predictor.from_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    test = fmnist_dataset("test", p.taxonomy, limit=2000)
    out = p.predict_arrays(test.images)
    fine = float((out["primary_fine"] == test.fine).mean())
    coarse = float((out["primary_coarse"] == test.coarse).mean())
    assert fine >= 0.92, fine
    assert coarse >= 0.965, coarse  # measured 0.9705 on these 2,000 images
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
    assert out["n"] == 500 and out["fine_top1"] > 0.9 and out["consistency"] == 1.0
    assert (tmp_path / "confusion-fine.png").is_file() and (tmp_path / "confusion-coarse.png").is_file()
