"""The GPU launcher, checked without a GPU: one process per requested GPU id with the right environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from catalog.errors import ConfigError
from worker.ops.launcher import WorkerSpec, build_specs, parse_gpus, parse_queues, run_workers


def test_parse_gpus():
    assert parse_gpus("none") == [None]
    assert parse_gpus("0,2") == ["0", "2"]
    assert parse_gpus("all", available=["0", "1"]) == ["0", "1"]
    assert parse_gpus("auto", available=[]) == [None]
    with pytest.raises(ConfigError):
        parse_gpus("all", available=[])
    with pytest.raises(ConfigError):
        parse_gpus("0,x")
    with pytest.raises(ConfigError):
        parse_queues("bulk,nightly")


def test_specs_pin_each_gpu_and_name_each_node():
    specs = build_specs(["0", "2"], ["uploads", "bulk"], threads=3)
    assert len(specs) == 4
    assert {(s.gpu, s.queue) for s in specs} == {("0", "uploads"), ("0", "bulk"), ("2", "uploads"), ("2", "bulk")}
    assert len({s.nodename for s in specs}) == 4
    for s in specs:
        assert s.env["CUDA_VISIBLE_DEVICES"] == s.gpu
        assert s.env["STYLETAG_DEVICE"] == "cuda"
        assert s.env["STYLETAG_TORCH_THREADS"] == "3"
        assert s.argv[s.argv.index("-Q") + 1] == s.queue
        prefetch = s.argv[s.argv.index("--prefetch-multiplier") + 1]
        assert prefetch == "1" if s.queue == "bulk" else int(prefetch) > 1
    cpu = build_specs([None], ["bulk"])
    assert cpu[0].env["CUDA_VISIBLE_DEVICES"] == "" and cpu[0].env["STYLETAG_DEVICE"] == "cpu"


def test_bulk_procs_give_each_bulk_worker_a_pool_and_a_port_per_process():
    specs = build_specs(["0", "1"], ["uploads", "bulk"], metrics_port=9100, bulk_procs=3)
    conc = {(s.gpu, s.queue): s.argv[s.argv.index("--concurrency") + 1] for s in specs}
    assert conc == {("0", "uploads"): "1", ("0", "bulk"): "3", ("1", "uploads"): "1", ("1", "bulk"): "3"}
    ports = [(s.gpu, s.queue, int(s.env["STYLETAG_METRICS_PORT"])) for s in specs]
    # uploads one port, bulk three (its pool processes add their index): no two processes share one
    assert ports == [("0", "uploads", 9100), ("0", "bulk", 9101), ("1", "uploads", 9104), ("1", "bulk", 9105)]
    with pytest.raises(ConfigError, match="--bulk-procs must be 1 or more"):
        build_specs(["0"], ["bulk"], bulk_procs=0)


def test_launcher_starts_one_process_per_gpu_with_its_environment(tmp_path):
    """Replace the celery command by a probe that records its environment; run the real launcher."""
    probe = ("import json, os, sys; "
             "open(sys.argv[1], 'w').write(json.dumps({k: os.environ.get(k) for k in "
             "('CUDA_VISIBLE_DEVICES', 'STYLETAG_DEVICE', 'STYLETAG_QUEUE')}) + '\\n' + str(os.getpid()))")
    specs = []
    for s in build_specs(["0", "2", "5"], ["bulk"]):
        out = tmp_path / f"{s.nodename.split('@')[0]}.json"
        specs.append(WorkerSpec(s.gpu, s.queue, (sys.executable, "-c", probe, str(out)), s.env, s.nodename))
    assert run_workers(specs) == 0
    seen = {}
    for f in tmp_path.glob("*.json"):
        env_json, pid = f.read_text().split("\n")
        seen[f.stem] = (json.loads(env_json), int(pid))
    assert set(seen) == {"bulk-gpu0", "bulk-gpu2", "bulk-gpu5"}
    assert len({pid for _, pid in seen.values()}) == 3 and os.getpid() not in {pid for _, pid in seen.values()}
    for name, (env, _pid) in seen.items():
        assert env["CUDA_VISIBLE_DEVICES"] == name.removeprefix("bulk-gpu")
        assert env["STYLETAG_DEVICE"] == "cuda" and env["STYLETAG_QUEUE"] == "bulk"


def test_worker_dry_run_cli_never_imports_torch():
    code = ("import sys; from worker.cli import main; "
            "sys.argv=['styletag','worker','--gpus','1,3','--queues','bulk','--dry-run']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'launcher imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    specs = json.loads(proc.stdout)
    assert [(s["gpu"], s["CUDA_VISIBLE_DEVICES"]) for s in specs] == [("1", "1"), ("3", "3")]
