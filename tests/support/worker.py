"""A real ``styletag worker`` subprocess for tests, and the small waits and CLI runs around it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class WorkerProcess:
    """``styletag worker --gpus none --queues QUEUES --threads 1 [EXTRA]`` in its own session (process group),
    output in ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "uploads,bulk",
                 extra_args: tuple[str, ...] = ()):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--gpus", "none", "--queues", queues, "--threads", "1",
             "--bulk-procs", "1", *extra_args],  # one pool process (a CPU host's default is one per core)
            env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, n_nodes: int, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.text()[-3000:]}")
            if self.text().count(" ready.") >= n_nodes and self.text().count("model loaded") >= n_nodes:
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def run_cli(env: dict[str, str], *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
