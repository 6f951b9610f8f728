"""The benchmark suite's own smoke tests (the figures themselves come from ``make bench``):

* ``bench/gpu.sh`` runs end to end on its CPU fallback (this is all CI can run of it), with a tiny
  untrained checkpoint so that it does not depend on the shipped one;
* the summary table renders every result file, met and missed targets alike.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch

    from model.checkpoint import save_checkpoint
    from model.net import build_model
    from model.taxonomy import load_taxonomy

    torch.manual_seed(0)
    tax = load_taxonomy("fashion-mnist")
    model = build_model("resnet-tiny", len(tax.coarse.labels), len(tax.fine.labels), channels=1)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, model, {
        "taxonomy": tax.to_dict(), "backbone": "resnet-tiny", "input_size": 28, "channels": 1, "mean": [0.286],
        "std": [0.353], "thresholds": {"coarse": 0.5, "fine": 0.5}, "trained_at": datetime.now(UTC).isoformat()})
    return path


@pytest.mark.slow
def test_gpu_script_cpu_fallback_runs_every_part(tiny_checkpoint, tmp_path):
    env = {**os.environ, "STYLETAG_TORCH_THREADS": "1", "STYLETAG_FETCH_THREADS": "4", "STYLETAG_BATCH_SIZE": "32"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu", "--quick", "--model", str(tiny_checkpoint),
         "--kinds", "png28", "--products", "64", "--images", "16", "--procs", "1,2", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["machine"]["cuda"] is False and "fallback" in res["machine"]["device"]
    shipped = res["model_only"]["shipped"]
    assert shipped["backbone"] == "resnet-tiny" and shipped["bs64_on_device_img_s"] > 0
    assert res["model_only"]["resnet50_224"]["img_s"] > 0
    dec = res["jpeg_decoding"]
    assert dec["images"] == 16 and dec["torchvision_decode_jpeg_cpu_batched_img_s"] > 0
    pipe = res["pipeline"]["png28"]
    assert pipe["products"] == 64 and pipe["failed"] == 0
    assert pipe["img_s"] > 0 and 0 < pipe["ratio_to_bound"] and set(pipe["stage_rates"]) == {
        "fetch", "decode", "write", "model"}
    scaling = res["pipeline_scaling"]["png28"]
    assert [scaling[k]["products"] for k in ("procs1", "procs2")] == [64, 64]  # 2 processes x 32
    assert len(scaling["procs2"]["per_process_img_s"]) == 2 and scaling["procs2"]["img_s"] > 0


def test_summary_table_shows_met_missed_and_failed(tmp_path, monkeypatch):
    from bench import common as C
    from bench import run_all

    monkeypatch.setattr(C, "RESULTS", tmp_path)
    res = C.Result("writes", "test")
    res.checks.append(C.check("PG writes", 12_345.6, unit="products/s", target=">= 10000", met=True))
    res.checks.append(C.check("vs naive", 600.0, unit="img/s", baseline=100.0, baseline_label="naive", ratio=6.0,
                              target=">= 5 x", met=True))
    res.checks.append(C.check("vs dataloader", 90.0, unit="img/s", baseline=100.0, baseline_label="dl", ratio=0.9,
                              target=">= 0.95 x", met=False))
    res.write()
    data = json.loads((tmp_path / "writes.json").read_text())
    assert data["name"] == "writes" and data["met"] is False and data["machine"]["cores"] >= 1
    text = run_all.table(["writes", "e2e"], {"writes": (0, 1.0), "e2e": (1, 2.0)})
    lines = text.splitlines()
    assert "12,346" in text and "NO" in lines[4] and "100 naive" in lines[3]
    assert "FAILED (exit 1" in lines[-1]
