"""Tag writes: idempotent under redelivery, run counters counted exactly once per product, and only the
active model writes (activation decides, not training time)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, select

from catalog.db import session_scope
from catalog.errors import NotFound
from catalog.models import ModelVersionConflict, activate, register_model
from catalog.runs import cancel_run, create_run, finish_if_complete, get_run, mark_running
from catalog.schema import ModelVersion, Product, ProductStyle, TagState
from catalog.tags import ProductFailure, ProductTags, Tag, write_batch

OLD, NEW, NEWEST = "m-2025-01", "m-2025-02", "m-2025-03"


@pytest.fixture
def cat(db_url, seed):
    seeded = seed(db_url, 20)
    with session_scope(db_url) as s:
        for version, month in ((OLD, 1), (NEW, 2), (NEWEST, 3)):
            register_model(s, version, datetime(2025, month, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
        assert s.get(ModelVersion, OLD).status == "active"  # the first one registered: bootstrap
        activate(s, NEW, by="test")
    return seeded


def make_active(url, version):
    with session_scope(url) as s:
        activate(s, version, by="test")


def tags_for(cat, pid: int, fine: int = 7, score: float = 0.9) -> ProductTags:
    lm = cat.labels
    return ProductTags(pid, f"v{pid}", [
        Tag(lm.coarse_ids[5], score, True), Tag(lm.fine_ids[fine], score - 0.1, True),
        Tag(lm.coarse_ids[0], 0.05, False), Tag(lm.fine_ids[0], 0.04, False),
    ])


def write(url, model, tagged=(), failed=(), run_id=None):
    with session_scope(url) as s:
        return write_batch(s, run_id=run_id, model_version=model, tagged=list(tagged), failed=list(failed))


def snapshot(url):
    with session_scope(url) as s:
        styles = s.execute(select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score,
                                  ProductStyle.is_primary, ProductStyle.model_version)
                           .order_by(ProductStyle.product_id, ProductStyle.label_id)).all()
        states = s.execute(select(TagState.product_id, TagState.status, TagState.model_version, TagState.image_version,
                                  TagState.reason, TagState.run_id).order_by(TagState.product_id)).all()
    return [tuple(r) for r in styles], [tuple(r) for r in states]


def counters(url, run_id):
    with session_scope(url) as s:
        run = get_run(s, run_id)
        return run.done, run.failed, run.status


def new_run(url, total, model=NEW):
    with session_scope(url) as s:
        run = create_run(s, "manual", "all", model)
        mark_running(s, run.id, total=total)
        return run.id


def test_write_is_idempotent(cat):
    batch = [tags_for(cat, pid) for pid in cat.ids[:10]]
    fail = [ProductFailure(cat.ids[10], "v", "missing", "no object at file:///img/10.png")]
    first = write(cat.url, NEW, batch, fail)
    assert (first.tagged, first.failed, first.skipped, first.stale) == (10, 1, 0, 0)
    snap = snapshot(cat.url)
    assert len(snap[0]) == 40 and len(snap[1]) == 11
    write(cat.url, NEW, batch, fail)
    assert snapshot(cat.url) == snap
    with session_scope(cat.url) as s:
        assert s.get(TagState, cat.ids[0]).attempts == 2


def test_retag_replaces_the_label_set(cat):
    pid = cat.ids[0]
    write(cat.url, NEW, [tags_for(cat, pid, fine=7)])
    write(cat.url, NEW, [ProductTags(pid, "v2", [Tag(cat.labels.fine_ids[5], 0.7, True)])])
    styles, states = snapshot(cat.url)
    assert styles == [(pid, cat.labels.fine_ids[5], 0.7, True, NEW)]
    assert states[0][1] == "tagged"
    assert states[0][3] == "v2"


def test_failure_keeps_previous_tags(cat):
    pid = cat.ids[0]
    write(cat.url, NEW, [tags_for(cat, pid)])
    styles_before = snapshot(cat.url)[0]
    write(cat.url, NEW, failed=[ProductFailure(pid, "v9", "bad_image", "cannot decode")])
    styles, states = snapshot(cat.url)
    assert styles == styles_before
    assert states == [(pid, "failed", NEW, "v9", "bad_image", None)]


def test_only_the_active_model_writes_whatever_its_training_time(cat):
    ids = cat.ids[:5]
    write(cat.url, NEW, [tags_for(cat, p, score=0.8) for p in ids])
    snap = snapshot(cat.url)
    for inactive in (OLD, NEWEST):  # older and newer alike: not active, not written, counted nowhere
        out = write(cat.url, inactive, [tags_for(cat, p, score=0.6) for p in ids],
                    [ProductFailure(cat.ids[5], "v", "missing", "gone")])
        assert (out.tagged, out.failed, out.stale) == (0, 0, 6)
        assert snapshot(cat.url) == snap
    make_active(cat.url, OLD)  # a rollback to the older model: its tags win again
    out = write(cat.url, OLD, [tags_for(cat, p, score=0.7) for p in ids])
    assert (out.tagged, out.stale) == (5, 0)
    assert {r[4] for r in snapshot(cat.url)[0]} == {OLD}
    assert write(cat.url, NEW, [tags_for(cat, p) for p in ids]).stale == 5


def test_run_counters_count_each_product_once(cat):
    run_id = new_run(cat.url, total=12)
    batch_a = [tags_for(cat, p) for p in cat.ids[:8]]
    fail_b = [ProductFailure(p, "v", "unreachable", "S3 unreachable") for p in cat.ids[8:12]]
    write(cat.url, NEW, batch_a, run_id=run_id)
    write(cat.url, NEW, batch_a, run_id=run_id)  # redelivered
    write(cat.url, NEW, failed=fail_b, run_id=run_id)
    write(cat.url, NEW, failed=fail_b, run_id=run_id)  # redelivered
    assert counters(cat.url, run_id) == (8, 4, "running")
    # A later failure of an already tagged product in the same run changes nothing.
    write(cat.url, NEW, failed=[ProductFailure(cat.ids[0], "v", "unreachable", "x")], run_id=run_id)
    assert counters(cat.url, run_id) == (8, 4, "running")
    assert snapshot(cat.url)[1][0][1] == "tagged"
    with session_scope(cat.url) as s:
        assert not finish_if_complete(s, run_id + 1000)
        assert finish_if_complete(s, run_id)  # 8 + 4 >= 12
    assert counters(cat.url, run_id)[2] == "done"
    # A finished run takes no more writes: a late message of it is stale and counts nowhere.
    out = write(cat.url, NEW, [tags_for(cat, p) for p in cat.ids[8:10]], run_id=run_id)
    assert (out.tagged, out.stale) == (0, 2)
    assert counters(cat.url, run_id) == (8, 4, "done")
    # A resume (retry_failed) reopens it; retried failures move from failed to done.
    with session_scope(cat.url) as s:
        assert mark_running(s, run_id, retry_failed=True) == 4
    write(cat.url, NEW, [tags_for(cat, p) for p in cat.ids[8:10]], run_id=run_id)
    assert counters(cat.url, run_id) == (10, 0, "running")
    write(cat.url, NEW, failed=[ProductFailure(p, "v", "unreachable", "x") for p in cat.ids[10:12]], run_id=run_id)
    assert counters(cat.url, run_id) == (10, 2, "running")  # the resume recounted the run over all 20 products
    with session_scope(cat.url) as s:
        mark_running(s, run_id, total=12)  # (the 12 this test sent) finishes it
        assert not finish_if_complete(s, run_id)  # only once
    assert counters(cat.url, run_id) == (10, 2, "done")
    # A second run counts the same products afresh.
    run2 = new_run(cat.url, total=3)
    write(cat.url, NEW, [tags_for(cat, p) for p in cat.ids[:3]], run_id=run2)
    assert counters(cat.url, run2)[:2] == (3, 0)


def test_unregistered_model_and_version_conflict(cat):
    with pytest.raises(NotFound, match="register_model"):
        write(cat.url, "never-registered", [tags_for(cat, cat.ids[0])])
    with pytest.raises(ModelVersionConflict), session_scope(cat.url) as s:
        register_model(s, NEW, datetime(2024, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
    with session_scope(cat.url) as s:  # same values again: fine
        register_model(s, NEW, datetime(2025, 2, 1, tzinfo=UTC), "fashion-mnist", "resnet18")


def test_deleted_products_and_empty_batches_are_ignored(cat):
    with session_scope(cat.url) as s:
        s.execute(delete(Product).where(Product.id == cat.ids[0]))
    out = write(cat.url, NEW, [tags_for(cat, p) for p in cat.ids[:3]])
    assert (out.tagged, out.skipped) == (2, 1)
    assert write(cat.url, NEW).tagged == 0
    # In a run, a product deleted since it was enqueued counts as skipped, so the run still finishes.
    run_id = new_run(cat.url, total=3)
    write(cat.url, NEW, [tags_for(cat, p) for p in cat.ids[:3]], run_id=run_id)
    with session_scope(cat.url) as s:
        run = get_run(s, run_id)
        assert (run.done, run.failed, run.skipped) == (2, 0, 1)
        assert finish_if_complete(s, run_id)


def test_concurrent_overlapping_batches_on_postgres(pg_clean, seed):
    cat = seed(pg_clean, 400)
    with session_scope(pg_clean) as s:
        register_model(s, NEW, datetime(2025, 2, 1, tzinfo=UTC), "fashion-mnist", "resnet18")  # active: the first
    run_id = new_run(pg_clean, total=400)
    errors = []

    def worker(offset):
        try:
            for lo in range(offset, 400, 50):  # the two threads overlap on half of every batch
                write(pg_clean, NEW, [tags_for(cat, p) for p in cat.ids[lo:lo + 100]], run_id=run_id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 0, 50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counters(pg_clean, run_id)[:2] == (400, 0)
    assert len(snapshot(pg_clean)[0]) == 1600


def test_superseded_run_writes_nothing_and_counts_nowhere(cat):
    """Activating another model cancels the runs of the one it replaces; their late messages are stale."""
    ids = cat.ids[:6]
    run_id = new_run(cat.url, total=6, model=NEW)
    write(cat.url, NEW, [tags_for(cat, p, score=0.8) for p in ids[:3]], run_id=run_id)
    assert counters(cat.url, run_id) == (3, 0, "running")
    make_active(cat.url, NEWEST)
    assert counters(cat.url, run_id) == (3, 0, "cancelled")
    snap = snapshot(cat.url)
    for _ in range(2):
        out = write(cat.url, NEW, [tags_for(cat, p, score=0.6) for p in ids], run_id=run_id)
        assert (out.tagged, out.stale) == (0, 6)
    assert counters(cat.url, run_id) == (3, 0, "cancelled")
    assert snapshot(cat.url) == snap
    # A run whose model is not the run's, or of another run's model, is refused too.
    run2 = new_run(cat.url, total=6, model=NEWEST)
    assert write(cat.url, NEW, [tags_for(cat, p) for p in ids], run_id=run2).stale == 6
    with session_scope(cat.url) as s:
        cancel_run(s, run2)
    assert counters(cat.url, run2) == (0, 0, "cancelled")
