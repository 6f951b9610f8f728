"""Fixtures for the worker tests: an imported catalog on PostgreSQL, a Redis database of our own, and
a real ``styletag worker`` (Celery) subprocess serving both queues on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REDIS_DB = int(os.environ.get("STYLETAG_TEST_REDIS_DB", "11"))
N_PRODUCTS = 500


from tests.conftest import truncate_all  # noqa: E402,F401 - one truncate for every test package


@pytest.fixture(scope="session")
def broker_url() -> str:
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def worker_env(pg_url, broker_url, store_dir, tmp_path_factory) -> dict[str, str]:
    """Environment shared by the CLI, the inline pipeline and the worker subprocess."""
    home = tmp_path_factory.mktemp("home")
    env = {
        "STYLETAG_DATABASE_URL": pg_url,
        "STYLETAG_BROKER_URL": broker_url,
        "STYLETAG_STORE_URL": store_dir.as_uri(),
        "STYLETAG_ALLOWED_IMAGE_PREFIXES": store_dir.as_uri() + "/",
        "STYLETAG_HOME": str(home),
        "STYLETAG_BATCH_SIZE": "64",
        "STYLETAG_FETCH_THREADS": "4",
        "STYLETAG_TORCH_THREADS": "1",
        "STYLETAG_UPLOAD_BATCH": "32",
        "STYLETAG_UPLOAD_INTERVAL": "0.25",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def _reset_pool(app) -> None:
    """Drop the app's producer pool so the next send connects to the broker now configured."""
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture(scope="module")
def apply_env(worker_env):
    """Put worker_env into this process's environment for the module (the inline pipeline reads it)."""
    old = {k: os.environ.get(k) for k in worker_env}
    os.environ.update(worker_env)
    from worker.app import app
    from worker.context import reset_context

    # worker.app may have been imported (by another test module) before this environment was set.
    old_broker = app.conf.broker_url
    app.conf.broker_url = worker_env["STYLETAG_BROKER_URL"]
    _reset_pool(app)
    reset_context()
    yield worker_env
    app.conf.broker_url = old_broker
    _reset_pool(app)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_context()


@pytest.fixture(scope="module")
def catalog_500(apply_env, pg_url):
    """500 Fashion-MNIST test products on PostgreSQL with a file store."""
    from catalog.importers import import_fashion_mnist

    truncate_all(pg_url)
    import_fashion_mnist(pg_url, apply_env["STYLETAG_STORE_URL"], "test", limit=N_PRODUCTS, progress=False)
    return pg_url


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, queues: str = "uploads,bulk"):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--gpus", "none", "--queues", queues, "--threads", "1"],
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


@pytest.fixture(scope="module")
def celery_worker(catalog_500, apply_env, tmp_path_factory):
    w = WorkerProcess(apply_env, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        w.wait_ready(2)
    except BaseException:
        w.stop(signal.SIGKILL)
        raise
    yield w
    w.stop()


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
