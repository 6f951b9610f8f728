"""``styletag worker --bulk-procs N``: N bulk pool processes per device, each with its own metrics
port, sharing one run (a real worker, PostgreSQL and Redis)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from catalog.settings import Settings
from tests.conftest import free_port, truncate_all
from tests.ops.test_smoke import (
    BIN,
    BROKER_URL,
    Proc,
    enqueue_run_on,
    metric,
    run_counts,
    samples,
    service_env,
    wait_http,
    wait_run_done,
)

pytestmark = pytest.mark.slow

N = 192
CHUNK = 8


def test_two_bulk_processes_share_a_run_and_each_serves_its_metrics(pg_url, tmp_path):
    from catalog.importers import import_fashion_mnist
    from tests.ops.test_smoke import http_get
    from worker.producers.retag import start_run

    truncate_all(pg_url)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    store = tmp_path / "images"
    import_fashion_mnist(pg_url, store.as_uri(), "test", limit=N, progress=False)
    env = service_env(STYLETAG_DATABASE_URL=pg_url, STYLETAG_BROKER_URL=BROKER_URL, STYLETAG_HOME=str(tmp_path),
                      STYLETAG_STORE_URL=store.as_uri(), STYLETAG_ALLOWED_IMAGE_PREFIXES=store.as_uri() + "/",
                      STYLETAG_BATCH_SIZE=str(CHUNK))
    settings = replace(Settings.from_env(), database_url=pg_url, broker_url=BROKER_URL)
    run_id = start_run(settings, scope="all")
    assert enqueue_run_on(BROKER_URL, settings, run_id, CHUNK) == N
    port = free_port(2)
    worker = Proc("worker", [str(BIN / "styletag"), "worker", "--gpus", "none", "--queues", "bulk", "--bulk-procs",
                             "2", "--metrics-port", str(port)], env, tmp_path)
    try:
        urls = [f"http://127.0.0.1:{p}/metrics" for p in (port, port + 1)]
        for url in urls:
            wait_http(url, 180, worker)
        wait_run_done(pg_url, run_id, worker, 180)
        tagged = [metric(samples(http_get(url)), "styletag_products_tagged_total") for url in urls]
        assert sum(tagged) == run_counts(pg_url, run_id)[("tagged", None)] == N
        assert all(t > 0 for t in tagged), tagged  # both processes worked on the run
    finally:
        worker.terminate()
        worker.stop()
        broker.flushdb()
