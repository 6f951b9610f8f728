"""The GPU launcher, checked without a GPU: one process per requested GPU id with the right environment."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from catalog.errors import ConfigError
from worker.ops.launcher import (
    EXIT_CRASH_LOOP,
    RestartPolicy,
    WorkerSpec,
    build_specs,
    parse_gpus,
    parse_queues,
    run_workers,
)


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
    # 2 x (1 + 3) pool processes share the host's cores for decoding: each one is told how many there are
    assert {s.env["STYLETAG_HOST_PROCS"] for s in specs} == {"8"}
    assert {s.env["STYLETAG_HOST_PROCS"] for s in build_specs([None], ["bulk"], bulk_procs=1)} == {"1"}
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


# --- supervision (issue 15, item 1): a dead worker is restarted; a crash loop ends the launcher ---------

def _probe_specs(tmp_path, script: str, n: int = 1) -> list[WorkerSpec]:
    """Specs whose process is ``python -c script <counter file>``; the script sees how often it ran."""
    specs = []
    for i, s in enumerate(build_specs([str(g) for g in range(n)], ["bulk"])):
        counter = tmp_path / f"starts-{i}"
        specs.append(WorkerSpec(s.gpu, s.queue, (sys.executable, "-c", script, str(counter)), s.env, s.nodename))
    return specs


COUNT = "import os, sys, time; f = open(sys.argv[1], 'a'); f.write('x'); f.close(); n = len(open(sys.argv[1]).read())\n"


def test_a_worker_that_dies_is_restarted_with_backoff(tmp_path, caplog):
    """Dies (SIGKILL of itself) on its first two starts, then exits 0: started three times, then done."""
    script = COUNT + "if n <= 2: os.kill(os.getpid(), 9)\n"
    specs = _probe_specs(tmp_path, script)
    policy = RestartPolicy(max_restarts=5, window_s=60, backoff_start=0.2, backoff_max=1)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="styletag.launcher"):
        assert run_workers(specs, policy, poll_s=0.05) == 0
    elapsed = time.monotonic() - t0
    assert (tmp_path / "starts-0").read_text() == "xxx"
    assert elapsed >= 0.2 + 0.4 - 0.05, elapsed  # backoff 0.2 s, then 0.4 s
    restarts = [r.getMessage() for r in caplog.records if "restarting it in" in r.getMessage()]
    assert len(restarts) == 2 and "was killed by SIGKILL" in restarts[0], restarts
    assert "restarting it in 0.2 s" in restarts[0] and "restarting it in 0.4 s" in restarts[1]


def test_a_crash_loop_gives_up_loudly_and_stops_the_other_workers(tmp_path, caplog):
    """Worker 0 always exits 1; worker 1 runs until SIGTERM. After max_restarts the launcher gives up
    with one critical line, stops worker 1 and exits EXIT_CRASH_LOOP."""
    crash = COUNT + "sys.exit(1)\n"
    stay = COUNT + ("import signal\nsignal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1] + '.term', 'w').close(), "
                    "sys.exit(0)))\ntime.sleep(120)\n")
    specs = _probe_specs(tmp_path, crash, 2)
    specs[1] = WorkerSpec(specs[1].gpu, specs[1].queue, (sys.executable, "-c", stay, str(tmp_path / "starts-1")),
                          specs[1].env, specs[1].nodename)
    policy = RestartPolicy(max_restarts=3, window_s=60, backoff_start=0.05, backoff_max=0.1)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="styletag.launcher"):
        code = run_workers(specs, policy, poll_s=0.05)
    assert code == EXIT_CRASH_LOOP == 3
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "starts-0").read_text() == "x" * 4  # first start + 3 restarts
    assert (tmp_path / "starts-1").read_text() == "x" and (tmp_path / "starts-1.term").exists()
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "crash loop, giving up" in critical[0].getMessage()
    assert "exited with status 1" in critical[0].getMessage()


def test_sigterm_is_forwarded_and_nothing_is_restarted_while_stopping(tmp_path):
    """The launcher in its own process: SIGTERM reaches the worker (warm shutdown), which exits 0; no restart."""
    stay = COUNT + ("import signal\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                    "time.sleep(120)\n")
    counter = tmp_path / "starts-0"
    code = ("import sys; from worker.ops.launcher import run_workers, build_specs, WorkerSpec, RestartPolicy\n"
            "s = build_specs(['0'], ['bulk'])[0]\n"
            f"spec = WorkerSpec(s.gpu, s.queue, (sys.executable, '-c', {stay!r}, {str(counter)!r}), s.env, s.nodename)\n"
            "sys.exit(run_workers([spec], RestartPolicy(backoff_start=0.05), poll_s=0.05))\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not counter.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert counter.read_text() == "x"


def test_default_bulk_procs_one_per_gpu_and_one_per_core_without_gpus(monkeypatch):
    import os

    import worker.ops.launcher as launcher

    assert launcher.usable_cores() == len(os.sched_getaffinity(0))  # a container's cpuset, not the host's cores

    gpu = build_specs(["0", "1"], ["uploads", "bulk"])
    assert {s.argv[s.argv.index("--concurrency") + 1] for s in gpu} == {"1"}
    for cores, procs in ((2, 2), (1, 1), (6, 6), (64, launcher.CPU_BULK_PROCS_MAX)):
        monkeypatch.setattr(launcher, "usable_cores", lambda c=cores: c)
        specs = {s.queue: s for s in build_specs([None], ["uploads", "bulk"])}
        assert specs["bulk"].argv[specs["bulk"].argv.index("--concurrency") + 1] == str(procs)
        assert specs["uploads"].argv[specs["uploads"].argv.index("--concurrency") + 1] == "1"
        assert specs["bulk"].env["STYLETAG_HOST_PROCS"] == str(procs + 1)  # they share the cores for decoding
