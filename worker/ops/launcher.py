"""``styletag worker``: one Celery worker per GPU (per queue group), each pinned with CUDA_VISIBLE_DEVICES.

The launcher never imports torch: it discovers GPUs with ``nvidia-smi`` and sets the environment
before each child starts, so CUDA is initialised only inside the pinned process.

Why two consumers per GPU: Celery's prefetch is per connection, not per queue. Micro-batching uploads
needs a deep prefetch (a burst must reach the worker to be batched), while bulk chunks need
prefetch 1 so that several GPUs share a run fairly and a killed worker holds only one chunk. So each
GPU gets an ``uploads`` worker and a ``bulk`` worker; the uploads one is idle most of the time and
never waits behind a bulk chunk, which is what "uploads are served first" needs.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from catalog.errors import ConfigError
from catalog.settings import child_environment

log = logging.getLogger("styletag.launcher")

QUEUE_GROUPS = ("uploads", "bulk")


@dataclass(frozen=True)
class WorkerSpec:
    gpu: str | None  # None = CPU
    queue: str
    argv: tuple[str, ...]
    env: dict[str, str]
    nodename: str


def discover_gpus() -> list[str]:
    """GPU indices from nvidia-smi; an empty list when there is none (never touches CUDA)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def parse_gpus(value: str | None, available: list[str] | None = None) -> list[str | None]:
    """``all`` | ``none`` | ``0,2`` -> GPU ids (``[None]`` means one CPU worker)."""
    value = (value or "").strip().lower()
    if value in ("", "auto"):
        gpus = discover_gpus() if available is None else available
        return list(gpus) or [None]
    if value == "none":
        return [None]
    if value == "all":
        gpus = discover_gpus() if available is None else available
        if not gpus:
            raise ConfigError("--gpus all: no GPU found by nvidia-smi; use --gpus none for a CPU worker")
        return list(gpus)
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ConfigError(f"--gpus must be all, none or a list of GPU indices like 0,2; got {value!r}")
    return list(dict.fromkeys(ids))


def parse_queues(value: str) -> list[str]:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUE_GROUPS]
    if not queues or bad:
        raise ConfigError(f"--queues must name uploads and/or bulk; got {value!r}")
    return queues


def build_specs(gpus: list[str | None], queues: list[str], *, threads: int | None = None,
                loglevel: str = "INFO", metrics_port: int = 0, bulk_procs: int = 1) -> list[WorkerSpec]:
    """``bulk_procs``: pool processes of each bulk worker (each loads the model on its GPU). One process
    is bound by its Python (fetch, decode, write under one GIL) at ~1,400 images/s on an H100 host while
    the GPU idles, so a host with spare cores runs more than one per GPU (docs/performance.md)."""
    from worker.app import UPLOAD_FLUSH_EVERY

    if bulk_procs < 1:
        raise ConfigError(f"--bulk-procs must be 1 or more, got {bulk_procs}")
    host = socket.gethostname()
    specs = []
    port = metrics_port
    for gpu in gpus:
        slot = f"gpu{gpu}" if gpu is not None else "cpu"
        for queue in queues:
            procs = bulk_procs if queue == "bulk" else 1
            overrides = {"CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "",
                         "device": "cuda" if gpu is not None else "cpu", "gpu": gpu if gpu is not None else "none",
                         "queue": queue}
            if threads:
                overrides["torch_threads"] = str(threads)
            if port:  # one port per pool process: STYLETAG_METRICS_PORT + the process's pool index
                overrides["metrics_port"] = str(port)
                port += procs
            env = child_environment(**overrides)
            prefetch = "1" if queue == "bulk" else str(4 * UPLOAD_FLUSH_EVERY)
            nodename = f"{queue}-{slot}@{host}"
            argv = (
                sys.executable, "-m", "celery", "--app", "worker.app:app", "worker",
                "-Q", queue, "-n", nodename, "--pool", "prefork", "--concurrency", str(procs),
                "--prefetch-multiplier", prefetch, "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            )
            specs.append(WorkerSpec(gpu, queue, argv, env, nodename))
    return specs


def run_workers(specs: list[WorkerSpec]) -> int:
    """Start every worker, forward SIGTERM/SIGINT (warm shutdown), exit when all have exited."""
    procs = []
    for spec in specs:
        log.info("starting %s (CUDA_VISIBLE_DEVICES=%r)", spec.nodename, spec.env["CUDA_VISIBLE_DEVICES"])
        procs.append(subprocess.Popen(spec.argv, env=spec.env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in procs:
        code = code or (p.returncode or 0)
    return code
