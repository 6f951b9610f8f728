"""Issue 6, item 9: hostile messages sent straight to the broker, served by the real worker subprocess.

A pickled message with an unknown task name (tests/worker/test_celery_worker.py has the pickled message
for the real task), an unknown task, unknown keyword arguments, wrongly typed arguments, a body that is
not a Celery body, ids and runs that do not exist, and 10^6 ids in one message: each is refused (or
finds nothing) without writing a row, without moving a run's counters, and without killing the worker,
which then serves the next valid message.
"""

from __future__ import annotations

import re
import time

import pytest
from kombu import Connection
from sqlalchemy import func, select

from catalog.db import session_scope
from catalog.schema import Product, ProductStyle, TaggingRun, TagState
from tests.support.security import _png
from tests.support.worker import wait_until


class _Boom:
    """Unpickling this runs ``open(marker, 'w')``: proof that nobody unpickled it is the file's absence."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def producer(sec, hostile_catalog, sec_worker):
    from worker.app import make_app

    sec_worker.wait_ready(1, timeout=180)
    app = make_app(sec.settings())
    yield app
    app.close()


def _snapshot(url: str) -> dict:
    with session_scope(url) as s:
        return {
            "products": s.scalar(select(func.count()).select_from(Product)),
            "styles": s.execute(select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score,
                                       ProductStyle.model_version, ProductStyle.tagged_at)
                                .order_by(ProductStyle.product_id, ProductStyle.label_id)).all(),
            "states": s.execute(select(TagState.product_id, TagState.status, TagState.reason, TagState.run_id,
                                       TagState.attempts, TagState.updated_at).order_by(TagState.product_id)).all(),
            "runs": s.execute(select(TaggingRun.id, TaggingRun.status, TaggingRun.total, TaggingRun.done,
                                     TaggingRun.failed).order_by(TaggingRun.id)).all(),
        }


def _new_product(url: str, sec, sku: str) -> int:
    (sec.store / "img" / f"{sku}.png").write_bytes(_png(hash(sku) % 1000))
    with session_scope(url) as s:
        p = Product(sku=sku, title=sku, image_uri=f"{sec.store_uri}/img/{sku}.png", image_version="v1")
        s.add(p)
        s.flush()
        return p.id


def _tagged(url: str, pid: int) -> bool:
    with session_scope(url) as s:
        st = s.get(TagState, pid)
        return st is not None and st.status == "tagged"


def test_refused_messages_change_nothing(producer, sec, sec_worker, hostile_catalog, tmp_path):
    url = sec.db.admin_url
    pid = _new_product(url, sec, "msg-target")  # untagged: any message that ran would tag it
    before = _snapshot(url)
    marker = tmp_path / "unpickled"
    with Connection(sec.broker_url) as conn:  # a pickled message, for a task nobody registered
        conn.Producer(serializer="pickle").publish(
            {"args": [None, [pid]], "kwargs": {}, "boom": _Boom(str(marker))}, routing_key="bulk", exchange="",
            serializer="pickle", headers={"task": "styletag.evil", "id": "pickled-evil", "lang": "py"})
        conn.Producer(serializer="json").publish(  # JSON, but not a Celery body
            "rm -rf /", routing_key="bulk", exchange="", serializer="json",
            headers={"task": "styletag.tag_products", "id": "not-a-body", "lang": "py"})
    sent = {
        "unknown-task": producer.send_task("styletag.delete_everything", args=([pid],), queue="bulk").id,
        "unknown-kwarg": producer.send_task("styletag.tag_products", args=(None, [pid]), kwargs={"evil": 1},
                                            queue="bulk").id,
        "kwargs-only-extra": producer.send_task(
            "styletag.tag_products", kwargs={"run_id": None, "product_ids": [pid], "shell": "id"}, queue="bulk").id,
        "ids-as-string": producer.send_task("styletag.tag_products", args=(None, f"{pid},{pid}"), queue="bulk").id,
        "ids-negative": producer.send_task("styletag.tag_products", args=(None, [-pid]), queue="bulk").id,
        "ids-bool": producer.send_task("styletag.tag_products", args=(None, [True]), queue="bulk").id,
        "ids-float": producer.send_task("styletag.tag_products", args=(None, [float(pid)]), queue="bulk").id,
        "ids-nested": producer.send_task("styletag.tag_products", args=(None, [[pid]]), queue="bulk").id,
        "run-id-sql": producer.send_task("styletag.tag_products", args=("1; DROP TABLE products", [pid]),
                                         queue="bulk").id,
        "too-many-args": producer.send_task("styletag.tag_products", args=(None, [pid], "extra"), queue="bulk").id,
    }
    # A sentinel behind them all (one consumer, prefetch 1: served in order): when it is done, so are they.
    sentinel = _new_product(url, sec, "msg-sentinel")
    producer.send_task("styletag.tag_products", args=(None, [sentinel]), queue="bulk")
    wait_until(lambda: _tagged(url, sentinel), timeout=90)
    log = sec_worker.text()
    assert "Received unregistered task of type 'styletag.delete_everything'" in log
    assert "Received unregistered task of type 'styletag.evil'" in log  # discarded, its body never unpickled
    assert "Received invalid task message: malformed task body (str)" in log  # worker/tasks.py guard_strategy
    assert "unexpected keyword argument 'evil'" in log and "unexpected keyword argument 'shell'" in log
    for name in ("ids-as-string", "ids-negative", "ids-bool", "ids-float", "ids-nested", "run-id-sql"):
        assert f"refused message {sent[name]}" in log, name
    assert not marker.exists()  # never unpickled
    after = _snapshot(url)
    assert after["runs"] == before["runs"] and after["products"] == before["products"] + 1
    # every earlier state row unchanged; the one new row is the sentinel's (msg-target: none)
    assert after["states"][:-1] == before["states"] and after["states"][-1].product_id == sentinel
    assert not _tagged(url, pid)
    assert sec_worker.proc.poll() is None and "WorkerLostError" not in log


def test_ids_and_runs_that_do_not_exist(producer, sec, sec_worker, hostile_catalog):
    url = sec.db.admin_url
    run_id = hostile_catalog.celery_run["id"]
    with session_scope(url) as s:
        known_pid = s.scalar(select(Product.id).where(Product.sku == "img/one_pixel.png"))
    before = _snapshot(url)
    ghost_ids = [10**9 + i for i in range(100)] + [2**63 - 1]
    out_of_range = [2**63, 10**30]  # beyond BIGINT: refused by validate_ids before any lookup, nothing runs
    tasks = {
        "ghost ids in a real run": producer.send_task("styletag.tag_products", args=(run_id, ghost_ids), queue="bulk").id,
        "ghost ids, no run": producer.send_task("styletag.tag_products", args=(None, ghost_ids), queue="bulk").id,
        "ghost run, ghost ids": producer.send_task("styletag.tag_products", args=(2**31 - 7, ghost_ids), queue="bulk").id,
        "ghost run, real id": producer.send_task("styletag.tag_products", args=(2**31 - 7, [known_pid]), queue="bulk").id,
        "ids beyond bigint": producer.send_task("styletag.tag_products", args=(run_id, out_of_range), queue="bulk").id,
    }
    finished = ("succeeded in", "raised unexpected", "reject requeue")
    wait_until(lambda: all(any(f"[{t}] {word}" in sec_worker.text() for word in finished) for t in tasks.values()),
               timeout=90)
    log = sec_worker.text()
    name = "ghost ids, no run"  # found nothing to do
    assert re.search(rf"\[{tasks[name]}\] succeeded in [0-9.]+s: {{'tagged': 0, 'failed': 0, 'stale': 0}}", log), name
    # a run that is done, or that does not exist: its message is stale and does nothing
    for name in ("ghost ids in a real run", "ghost run, ghost ids", "ghost run, real id"):
        assert re.search(rf"\[{tasks[name]}\] succeeded in [0-9.]+s: {{'tagged': 0, 'failed': 0, 'stale': [0-9]+}}",
                         log), name
    assert f"[{tasks['ids beyond bigint']}] reject requeue=False" in log
    after = _snapshot(url)
    assert after == before  # no product, tag, state or run counter moved
    run = next(r for r in after["runs"] if r.id == run_id)
    assert (run.status, run.done + run.failed, run.total) == ("done", len(hostile_catalog.rows), len(hostile_catalog.rows))
    assert sec_worker.proc.poll() is None and "WorkerLostError" not in sec_worker.text()


def test_a_million_ids_refused_unexecuted_then_next_message_served(producer, sec, sec_worker, hostile_catalog):
    url = sec.db.admin_url
    pid = _new_product(url, sec, "after-the-million")
    before = _snapshot(url)
    big = producer.send_task("styletag.tag_products", args=(None, list(range(1, 10**6 + 1))), queue="bulk").id
    t0 = time.monotonic()
    producer.send_task("styletag.tag_products", args=(None, [pid]), queue="bulk")
    wait_until(lambda: _tagged(url, pid), timeout=120)
    served_s = time.monotonic() - t0
    log = sec_worker.text()
    assert f"refused message {big}: 1000000 ids in one message, over the limit of 10000" in log
    after = _snapshot(url)
    assert after["runs"] == before["runs"]
    assert [s.product_id for s in after["states"]] == sorted([*(s.product_id for s in before["states"]), pid])
    assert sec_worker.proc.poll() is None and "WorkerLostError" not in log
    print(f"a 10^6-id message refused and the next message tagged in {served_s:.1f}s")
