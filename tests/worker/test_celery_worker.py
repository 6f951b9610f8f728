"""End to end through a real Celery worker subprocess, PostgreSQL, Redis and a file store.

The tests in this module share one worker and one catalog and run in file order.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import replace

import pytest
from sqlalchemy import func, select, text

from catalog.db import session_scope
from catalog.schema import Product, ProductStyle, StyleLabel, TaggingRun, TagState
from catalog.settings import Settings
from tests.support.worker import run_cli, wait_until
from tests.worker.conftest import N_PRODUCTS

pytestmark = pytest.mark.slow


def tags_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every product's tags keyed by SKU, with scores rounded (the two sides may batch differently)."""
    out: dict[str, list[tuple]] = {}
    with session_scope(url) as s:
        rows = s.execute(
            select(Product.sku, StyleLabel.level, StyleLabel.name, ProductStyle.score, ProductStyle.is_primary,
                   ProductStyle.model_version)
            .join(ProductStyle, ProductStyle.product_id == Product.id)
            .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
        ).all()
    for sku, level, name, score, primary, version in rows:
        out.setdefault(sku, []).append((level, name, round(score, 3), bool(primary), version))
    return {k: sorted(v) for k, v in out.items()}


def state_rows(url: str) -> list[tuple]:
    with session_scope(url) as s:
        return s.execute(select(TagState.product_id, TagState.status, TagState.run_id, TagState.model_version,
                                TagState.reason).order_by(TagState.product_id)).all()


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_retag_all_through_celery_tags_every_product_once(celery_worker, apply_env, catalog_500):
    proc = run_cli(apply_env, "retag", "--all", "--wait", "--timeout", "300", "--json", "--chunk", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = last_json_line(proc.stdout)
    assert run["status"] == "done"
    assert run["total"] == N_PRODUCTS and run["done"] == N_PRODUCTS and run["failed"] == 0
    rows = state_rows(catalog_500)
    assert len(rows) == N_PRODUCTS
    assert {(r.status, r.run_id) for r in rows} == {("tagged", run["id"])}
    with session_scope(catalog_500) as s:
        primaries = s.execute(
            select(ProductStyle.product_id, StyleLabel.level, func.count())
            .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
            .where(ProductStyle.is_primary)
            .group_by(ProductStyle.product_id, StyleLabel.level)
        ).all()
    assert len(primaries) == 2 * N_PRODUCTS and {c for *_, c in primaries} == {1}

    runs = run_cli(apply_env, "runs", str(run["id"]), "--json")
    assert runs.returncode == 0, runs.stderr
    info = json.loads(runs.stdout)
    assert info["done"] == info["total"] == N_PRODUCTS and info["status"] == "done"


def test_inline_on_sqlite_gives_the_same_tags_as_celery_on_postgres(catalog_500, apply_env, sqlite_url):
    from catalog.importers import import_fashion_mnist
    from worker.context import reset_context
    from worker.producers.retag import run_inline, start_run

    import_fashion_mnist(sqlite_url, apply_env["STYLETAG_STORE_URL"], "test", limit=N_PRODUCTS, progress=False)
    settings = replace(Settings.from_env(), database_url=sqlite_url)
    reset_context()
    try:
        run_id = start_run(settings, scope="all")
        report = run_inline(settings, run_id, progress=False)
    finally:
        reset_context()
    assert report.tagged == N_PRODUCTS and report.failed == 0
    inline, celery = tags_snapshot(sqlite_url), tags_snapshot(catalog_500)
    assert len(inline) == N_PRODUCTS
    assert inline == celery


def test_changed_only_rerun_enqueues_nothing(celery_worker, apply_env):
    proc = run_cli(apply_env, "retag", "--changed-only", "--wait", "--timeout", "60", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "enqueued 0 products" in proc.stderr
    run = last_json_line(proc.stdout)
    assert run["total"] == 0 and run["status"] == "done"


def _task_lines(worker) -> int:
    return len(re.findall(r"tag_products run=", worker.text()))


def test_redelivered_message_leaves_identical_rows(celery_worker, catalog_500):
    from worker.tasks import tag_products

    with session_scope(catalog_500) as s:
        run = s.scalars(select(TaggingRun).where(TaggingRun.scope == "all").order_by(TaggingRun.id)).first()
        ids = list(s.scalars(select(Product.id).order_by(Product.id).limit(100)))
    before_tags, before_state = tags_snapshot(catalog_500), state_rows(catalog_500)
    seen = _task_lines(celery_worker)
    for _ in range(2):  # the same message delivered twice
        tag_products.apply_async(args=(run.id, ids))
    wait_until(lambda: _task_lines(celery_worker) >= seen + 2, timeout=120)
    assert tags_snapshot(catalog_500) == before_tags
    assert state_rows(catalog_500) == before_state
    with session_scope(catalog_500) as s:
        again = s.get(TaggingRun, run.id)
        assert (again.done, again.failed, again.total) == (run.done, run.failed, run.total)


def _upload_batches(worker) -> list[int]:
    return [int(n) for n in re.findall(r"tag_uploads batch_size=(\d+)", worker.text())]


def test_burst_of_uploads_is_micro_batched(celery_worker, catalog_500, apply_env):
    from worker.producers.uploads import enqueue_uploads

    with session_scope(catalog_500) as s:
        skus = list(s.scalars(select(Product.sku).order_by(Product.id).offset(100).limit(200)))
        s.execute(text("UPDATE tag_state SET run_id = NULL WHERE product_id IN "
                       "(SELECT id FROM products ORDER BY id OFFSET 100 LIMIT 200)"))
    before = len(_upload_batches(celery_worker))
    ids = enqueue_uploads(skus)
    assert len(ids) == 200

    def done() -> bool:
        return sum(_upload_batches(celery_worker)[before:]) >= 200

    wait_until(done, timeout=120)
    sizes = _upload_batches(celery_worker)[before:]
    assert sum(sizes) == 200
    # A burst becomes full batches, never one model call per image: enqueued in one call, it travels in
    # messages of up to STYLETAG_UPLOAD_BATCH ids (test_upload_messages.py); the first is dispatched at once,
    # what arrives while it runs goes as one batch (CoalescingBatches).
    batch = int(apply_env["STYLETAG_UPLOAD_BATCH"])
    assert batch <= max(sizes), sizes
    assert len(sizes) <= 200 // batch + 1, sizes


LONE_UPLOAD_BOUND_S = 5.0  # flush interval 0.25 s + one small inference on a shared 2-core CPU


def test_lone_upload_is_tagged_quickly(celery_worker, catalog_500):
    from worker.producers.uploads import enqueue_upload_ids

    with session_scope(catalog_500) as s:
        pid = s.scalars(select(Product.id).order_by(Product.id.desc()).limit(1)).one()
        s.execute(text("DELETE FROM tag_state WHERE product_id = :p"), {"p": pid})
    time.sleep(0.5)  # let the previous test's flush timer go idle
    t0 = time.monotonic()
    enqueue_upload_ids([pid])

    def tagged():
        with session_scope(catalog_500) as s:
            return s.get(TagState, pid) is not None

    wait_until(tagged, timeout=30, interval=0.05)
    latency = time.monotonic() - t0
    assert latency < LONE_UPLOAD_BOUND_S, latency


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = (np.random.default_rng(seed).random((28, 28)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    return buf.getvalue()


def test_batch_with_bad_images_tags_the_good_ones(celery_worker, catalog_500, store_dir):
    from worker.tasks import tag_products

    good = _png(1)
    files = {
        "bad/good.png": good,
        "bad/empty.jpg": b"",
        "bad/corrupt.jpg": b"<html>502 Bad Gateway</html>",
        "bad/truncated.png": good[: len(good) // 2],
    }
    (store_dir / "bad").mkdir(exist_ok=True)
    for key, data in files.items():
        (store_dir / key).write_bytes(data)
    uris = {k: (store_dir / k).as_uri() for k in files}
    uris["bad/missing.png"] = (store_dir / "bad" / "missing.png").as_uri()
    with session_scope(catalog_500) as s:
        for key, uri in uris.items():
            s.add(Product(sku=f"bad-{key}", title=key, image_uri=uri, image_version="v1"))
        s.flush()
        ids = {p.sku: p.id for p in s.scalars(select(Product).where(Product.sku.like("bad-%")))}
    tag_products.apply_async(args=(None, sorted(ids.values())))

    def states():
        with session_scope(catalog_500) as s:
            rows = s.execute(select(Product.sku, TagState.status, TagState.reason)
                             .join(TagState, TagState.product_id == Product.id)
                             .where(Product.sku.like("bad-%"))).all()
        return {r.sku: (r.status, r.reason) for r in rows} if len(rows) == len(ids) else None

    got = wait_until(states, timeout=60)
    assert got["bad-bad/good.png"] == ("tagged", None)
    assert got["bad-bad/empty.jpg"] == ("failed", "empty")
    assert got["bad-bad/corrupt.jpg"] == ("failed", "not_an_image")
    assert got["bad-bad/truncated.png"][0] == "failed" and got["bad-bad/truncated.png"][1] in ("truncated", "bad_image")
    assert got["bad-bad/missing.png"] == ("failed", "missing")


def test_pickled_message_is_refused(celery_worker, catalog_500, broker_url):
    from kombu import Connection

    with session_scope(catalog_500) as s:
        p = Product(sku="pickle-target", title="x", image_uri=s.scalars(select(Product.image_uri).limit(1)).one(),
                    image_version="v1")
        s.add(p)
        s.flush()
        pid = p.id
    with Connection(broker_url) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish(
            {"args": [None, [pid]], "kwargs": {}},
            routing_key="bulk", exchange="", serializer="pickle",
            headers={"task": "styletag.tag_products", "id": "pickled-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    wait_until(lambda: "pickle" in celery_worker.text().lower() and "disallowed" in celery_worker.text().lower(),
               timeout=30)
    time.sleep(1.0)
    with session_scope(catalog_500) as s:
        assert s.get(TagState, pid) is None
    assert celery_worker.proc.poll() is None  # the worker is still alive
