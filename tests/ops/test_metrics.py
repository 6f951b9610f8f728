"""Prometheus metrics, scraped over HTTP from a real worker during and after a real run.

A run (Fashion-MNIST products plus three bad images) is enqueued before any worker is up, so the
deployment exporter (``styletag metrics --port``) sees a known queue depth per queue. Then a real
``styletag worker --metrics-port`` starts; its endpoint is scraped while it works (counters never
run ahead of the database) and after (counters equal the database's counts, by failure reason).
"""

from __future__ import annotations

import math
import time
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
    has_metric,
    http_get,
    metric,
    run_counts,
    samples,
    service_env,
    wait_http,
)

pytestmark = pytest.mark.slow

N_GOOD = 240
CHUNK = 8  # ids per bulk task: ~30 tasks, so a scrape lands in the middle of the run
N_UPLOADS = 5  # upload messages left waiting: this worker serves only the bulk queue
STAGES = ("fetch", "decode", "model", "write")
BAD = {"bad-empty": b"", "bad-corrupt": b"<html>502 Bad Gateway</html>"}
BAD_REASONS = {"bad-empty": "empty", "bad-corrupt": "not_an_image", "bad-missing": "missing"}


@pytest.fixture(scope="module")
def stack(pg_url, tmp_path_factory):
    from catalog.db import session_scope
    from catalog.importers import import_fashion_mnist
    from catalog.schema import Product
    from worker.app import UPLOADS_QUEUE, app
    from worker.producers.retag import start_run
    from worker.tasks import tag_uploads

    truncate_all(pg_url)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    home = tmp_path_factory.mktemp("metrics")
    store = home / "images"
    import_fashion_mnist(pg_url, store.as_uri(), "test", limit=N_GOOD, progress=False)
    for sku, data in BAD.items():
        (store / f"{sku}.png").write_bytes(data)
    with session_scope(pg_url) as s:
        for sku in BAD_REASONS:
            s.add(Product(sku=sku, title=sku, image_uri=(store / f"{sku}.png").as_uri(), image_version="v1"))
    env = service_env(STYLETAG_DATABASE_URL=pg_url, STYLETAG_BROKER_URL=BROKER_URL, STYLETAG_HOME=str(home),
                      STYLETAG_STORE_URL=store.as_uri(), STYLETAG_ALLOWED_IMAGE_PREFIXES=store.as_uri() + "/",
                      STYLETAG_BATCH_SIZE=str(CHUNK))
    exporter_port = free_port()
    procs = [Proc("exporter", [str(BIN / "styletag"), "metrics", "--port", str(exporter_port)], env, home)]
    try:
        settings = replace(Settings.from_env(), database_url=pg_url, broker_url=BROKER_URL)
        run_id = start_run(settings, scope="all")
        sent = enqueue_run_on(BROKER_URL, settings, run_id, CHUNK)
        assert sent == N_GOOD + len(BAD_REASONS)
        with app.connection_for_write(BROKER_URL) as conn:
            for pid in range(1, N_UPLOADS + 1):
                tag_uploads.apply_async(args=(pid,), queue=UPLOADS_QUEUE, connection=conn)
        wait_http(f"http://127.0.0.1:{exporter_port}/metrics", 60, procs[0])
        yield {"env": env, "db": pg_url, "run_id": run_id, "home": home, "procs": procs,
               "exporter": f"http://127.0.0.1:{exporter_port}/metrics", "settings": settings}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.stop()
        broker.flushdb()


def test_exporter_reports_queue_depth_per_queue_and_the_unfinished_run(stack):
    parsed = samples(http_get(stack["exporter"]))
    total = N_GOOD + len(BAD_REASONS)
    assert metric(parsed, "styletag_queue_depth", queue="bulk") == math.ceil(total / CHUNK)
    assert metric(parsed, "styletag_queue_depth", queue="uploads") == N_UPLOADS
    run = str(stack["run_id"])
    assert metric(parsed, "styletag_run_products", run_id=run, kind="manual") == total
    assert metric(parsed, "styletag_run_done_products", run_id=run) == 0
    assert metric(parsed, "styletag_run_failed_products", run_id=run) == 0
    assert metric(parsed, "styletag_run_age_seconds", run_id=run) >= 0
    assert metric(parsed, "styletag_broker_up") == 1 and metric(parsed, "styletag_database_up") == 1


def test_worker_counters_match_the_database_during_and_after_the_run(stack):
    from catalog.db import session_scope
    from catalog.runs import get_run
    from worker.producers.retag import current_model_version

    port = free_port()
    worker = Proc("worker", [str(BIN / "styletag"), "worker", "--gpus", "none", "--queues", "bulk",
                             "--bulk-procs", "1",  # one process: its counters are the run's (ports: test_smoke)
                             "--metrics-port", str(port)], stack["env"], stack["home"])
    stack["procs"].append(worker)
    url = f"http://127.0.0.1:{port}/metrics"
    run_id, db = stack["run_id"], stack["db"]
    total = N_GOOD + len(BAD_REASONS)

    # During: every scrape is followed by a read of the database; a counter is incremented only after
    # its batch committed, so it can never be ahead of what the database shows.
    wait_http(url, 180, worker)
    scrapes, mid_run, last_seen = 0, 0, -1.0
    deadline = time.monotonic() + 180
    while True:
        parsed = samples(http_get(url))
        seen = metric(parsed, "styletag_products_tagged_total") + metric(parsed, "styletag_products_failed_total")
        counts = run_counts(db, run_id)
        with session_scope(db) as s:
            status = get_run(s, run_id).status
        scrapes += 1
        assert seen >= last_seen, "a counter went backwards"
        assert seen <= sum(counts.values()), (seen, counts)
        mid_run += 0 < seen < total
        last_seen = seen
        if status == "done":
            break
        assert time.monotonic() < deadline, f"run not done:\n{worker.text()[-3000:]}"
        time.sleep(0.05)
    assert mid_run >= 1, f"no scrape landed while the run was half done ({scrapes} scrapes)"

    # After: the counters are the database's counts, failures by reason.
    parsed = samples(http_get(url))
    counts = run_counts(db, run_id)
    assert metric(parsed, "styletag_products_tagged_total") == counts[("tagged", None)] == N_GOOD
    db_failed = {reason: n for (st, reason), n in counts.items() if st == "failed"}
    assert db_failed == {reason: 1 for reason in BAD_REASONS.values()}
    for reason, n in db_failed.items():
        assert metric(parsed, "styletag_products_failed_total", reason=reason) == n, reason

    batches = metric(parsed, "styletag_batch_size_count")
    assert batches >= math.ceil(total / CHUNK) and metric(parsed, "styletag_batch_size_sum") == total
    for stage in STAGES:
        assert metric(parsed, "styletag_stage_seconds_count", stage=stage) == batches, stage
        assert metric(parsed, "styletag_stage_seconds_bucket", stage=stage, le="+Inf") == batches, stage
    assert metric(parsed, "styletag_stage_seconds_sum", stage="model") > 0
    assert not has_metric(parsed, "styletag_stage_seconds_count", stage="wall")  # its own histogram instead
    assert metric(parsed, "styletag_batch_seconds_count") == batches
    assert metric(parsed, "styletag_images_total") == total  # a counter: rate() gives images/s
    assert not has_metric(parsed, "styletag_images_per_second")

    version = current_model_version(stack["settings"])
    assert has_metric(parsed, "styletag_model_info", model_version=version, gpu="none", queue="bulk")
    assert metric(parsed, "styletag_model_info") == 1

    # The exporter: the bulk queue drained, the uploads queue untouched, the run no longer unfinished.
    parsed = samples(http_get(stack["exporter"]))
    assert metric(parsed, "styletag_queue_depth", queue="bulk") == 0
    assert metric(parsed, "styletag_queue_depth", queue="uploads") == N_UPLOADS
    assert not has_metric(parsed, "styletag_run_products", run_id=str(run_id))
    worker.stop(timeout=60)


def test_exporter_answers_when_the_broker_is_away(stack):
    """A scrape never fails because Redis is down: the queue depth is absent and broker_up says 0."""
    from prometheus_client import CollectorRegistry, generate_latest

    from worker.ops.metrics import DeploymentCollector

    registry = CollectorRegistry()
    registry.register(DeploymentCollector(replace(stack["settings"], broker_url=f"redis://127.0.0.1:{free_port()}/0")))
    parsed = samples(generate_latest(registry).decode())
    assert metric(parsed, "styletag_broker_up") == 0 and not has_metric(parsed, "styletag_queue_depth")
    assert metric(parsed, "styletag_database_up") == 1
