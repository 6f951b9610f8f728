"""Fixtures for the worker tests: an imported catalog on PostgreSQL, a Redis database of our own, and
a real ``styletag worker`` (Celery) subprocess serving both queues on the CPU."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis

REDIS_DB = int(os.environ.get("STYLETAG_TEST_REDIS_DB", "11"))
N_PRODUCTS = 500


from tests.conftest import truncate_all  # noqa: E402,F401 - one truncate for every test package

# WorkerProcess, run_cli and wait_until live in tests/support/worker.py; re-exported for the test modules of
# other areas that still import them from here (test_lifecycle_worker.py, test_uploads_intake.py).
from tests.support.worker import WorkerProcess, run_cli, wait_until  # noqa: E402,F401


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
