"""``styletag worker``: one Celery worker per GPU (per queue group), each pinned with CUDA_VISIBLE_DEVICES.

The launcher never imports torch: it discovers GPUs with ``nvidia-smi`` and sets the environment
before each child starts, so CUDA is initialised only inside the pinned process.

Why two consumers per GPU: Celery's prefetch is per connection, not per queue. Micro-batching uploads
needs a deep prefetch (a burst must reach the worker to be batched), while bulk chunks need
prefetch 1 so that several GPUs share a run fairly and a killed worker holds only one chunk. So each
GPU gets an ``uploads`` worker and a ``bulk`` worker; the uploads one is idle most of the time and
never waits behind a bulk chunk, which is what "uploads are served first" needs.

Supervision: the launcher restarts a Celery process that dies (a consumer stopped by an error, an OOM
kill, a SIGKILL), with backoff, and gives up loudly on a crash loop (:class:`RestartPolicy`): one
critical log line, every other worker stopped, exit status 3, for the container's or systemd's restart
policy to take over.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from catalog.errors import ConfigError
from catalog.settings import child_environment, usable_cores

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


CPU_BULK_PROCS_MAX = 8  # each process holds torch and a model (~0.4 GB): bounded on a large host


def cpu_bulk_procs() -> int:
    """Bulk processes of a host without GPUs: one per core (at most :data:`CPU_BULK_PROCS_MAX`). On the
    2-core machine two processes tagged 1,805-1,879 images/s where one did 1,495-1,537 (28 px, through
    Celery, docs/performance.md): one process's stages take turns on one GIL, and each task's first prepare and
    last write leave its model idle; two processes fill each other's gaps."""
    return max(1, min(CPU_BULK_PROCS_MAX, usable_cores()))


def build_specs(gpus: list[str | None], queues: list[str], *, threads: int | None = None,
                loglevel: str = "INFO", metrics_port: int = 0, bulk_procs: int | None = None) -> list[WorkerSpec]:
    """``bulk_procs``: pool processes of each bulk worker (each loads the model on its GPU). One process
    is bound by its Python (fetch, decode, write under one GIL) at ~1,400 images/s on an H100 host while
    the GPU idles, so a host with spare cores runs more than one per GPU (docs/performance.md). Default
    (None): 1 per GPU; without GPUs, :func:`cpu_bulk_procs`."""
    from worker.app import UPLOAD_FLUSH_EVERY

    if bulk_procs is None:
        bulk_procs = 1 if any(g is not None for g in gpus) else cpu_bulk_procs()
    if bulk_procs < 1:
        raise ConfigError(f"--bulk-procs must be 1 or more, got {bulk_procs}")
    host = socket.gethostname()
    # every pool process of every worker below loads a model and may start decoder processes: they share the cores
    host_procs = len(gpus) * sum(bulk_procs if queue == "bulk" else 1 for queue in queues)
    specs = []
    port = metrics_port
    for gpu in gpus:
        slot = f"gpu{gpu}" if gpu is not None else "cpu"
        for queue in queues:
            procs = bulk_procs if queue == "bulk" else 1
            overrides = {"CUDA_VISIBLE_DEVICES": gpu if gpu is not None else "",
                         "device": "cuda" if gpu is not None else "cpu", "gpu": gpu if gpu is not None else "none",
                         "queue": queue, "host_procs": str(host_procs)}
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


@dataclass(frozen=True)
class RestartPolicy:
    """How the launcher supervises its Celery processes: a process that dies (non-zero exit, or killed by a
    signal) while the launcher is not stopping is started again after ``backoff_start`` seconds, doubled
    for each further restart within ``window_s`` up to ``backoff_max``; more than ``max_restarts`` restarts
    of one process within ``window_s`` is a crash loop: the launcher stops every process and exits
    with :data:`EXIT_CRASH_LOOP`. A process that exits 0 by itself (a remote ``celery control shutdown``)
    is not restarted."""

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_start: float = 1.0
    backoff_max: float = 30.0

    def delay(self, recent: int) -> float:
        return min(self.backoff_max, self.backoff_start * 2 ** max(0, recent - 1))


EXIT_CRASH_LOOP = 3


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run_workers(specs: list[WorkerSpec], policy: RestartPolicy | None = None, poll_s: float = 0.2) -> int:
    """Start every worker and supervise them (:class:`RestartPolicy`); forward SIGTERM/SIGINT (warm
    shutdown) and return when all have exited: 0, a child's non-zero status, or EXIT_CRASH_LOOP."""
    supervisor = _Supervisor(specs, policy or RestartPolicy())
    previous = {sig: signal.signal(sig, lambda signum, _frame: supervisor.stop_all(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return supervisor.run(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Supervisor:
    def __init__(self, specs: list[WorkerSpec], policy: RestartPolicy):
        self.specs, self.policy = specs, policy
        self.procs: dict[int, subprocess.Popen | None] = {}
        self.due: dict[int, float] = {}  # index -> when a dead worker starts again
        self.history: dict[int, deque[float]] = {i: deque() for i in range(len(specs))}
        self.stopping = False
        self.code = 0

    def start(self, i: int) -> None:
        spec = self.specs[i]
        log.info("starting %s (CUDA_VISIBLE_DEVICES=%r)", spec.nodename, spec.env["CUDA_VISIBLE_DEVICES"])
        try:
            self.procs[i] = subprocess.Popen(spec.argv, env=spec.env)
        except OSError as exc:
            log.error("%s could not be started: %s", spec.nodename, exc)
            self.procs[i] = None
            self.code = self.code or 1

    def stop_all(self, signum: int) -> None:
        self.stopping = True
        self.due.clear()
        for p in self.procs.values():
            if p is not None and p.poll() is None:
                p.send_signal(signum)

    def _died(self, i: int, returncode: int, now: float) -> None:
        spec = self.specs[i]
        if self.stopping:
            self.code = self.code or returncode
            return
        if returncode == 0:
            log.warning("%s exited by itself (status 0); not restarted", spec.nodename)
            return
        recent = self.history[i]
        while recent and now - recent[0] > self.policy.window_s:
            recent.popleft()
        recent.append(now)
        if len(recent) > self.policy.max_restarts:
            log.critical("%s %s; it died %d times within %.0f s: crash loop, giving up (stopping every worker, "
                         "exit status %d)", spec.nodename, _describe(returncode), len(recent), self.policy.window_s,
                         EXIT_CRASH_LOOP)
            self.code = EXIT_CRASH_LOOP
            self.stop_all(signal.SIGTERM)
            return
        delay = self.policy.delay(len(recent))
        self.due[i] = now + delay
        log.error("%s %s; restarting it in %.1f s (restart %d of at most %d within %.0f s)", spec.nodename,
                  _describe(returncode), delay, len(recent), self.policy.max_restarts, self.policy.window_s)

    def run(self, poll_s: float) -> int:
        for i in range(len(self.specs)):
            self.start(i)
        while True:
            now = time.monotonic()
            for i in range(len(self.specs)):
                p = self.procs.get(i)
                if p is not None and p.poll() is not None:
                    self.procs[i] = None
                    self._died(i, p.returncode, now)
                elif p is None and not self.stopping and now >= self.due.get(i, float("inf")):
                    self.due.pop(i, None)
                    self.start(i)
            if not self.due and all(p is None for p in self.procs.values()):
                return self.code
            time.sleep(poll_s)


def ping_nodes(settings, nodenames: list[str], timeout: float = 5.0) -> list[str]:
    """The Celery nodes among ``nodenames`` that did not answer a ping within ``timeout`` (``styletag worker
    --health``: a container's health check; a consumer that died and is being restarted does not answer)."""
    from worker.app import make_app

    app = make_app(settings)
    try:
        replies = app.control.ping(destination=list(nodenames), timeout=timeout) or []
    finally:
        app.close()
    answered = {name for reply in replies for name in reply}
    return [n for n in nodenames if n not in answered]
