"""The write rules the fault tests rely on, checked directly on both databases (fast, no processes):

* a redelivered batch of a run writes nothing for products that run already tagged with the same model
  and image (no second upsert: ``attempts`` stays 1, ``tagged_at`` unchanged);
* a write outside any run (uploads) keeps ``tag_state.run_id``, so a stale redelivery of that run after
  an upload neither regresses the tags nor counts the product again; once another model is activated
  (the run is superseded), a redelivery of it writes nothing and counts nowhere;
* ``retag --resume`` (``mark_running(retry_failed=True)``) takes the run's failed products out of its
  ``failed`` counter, so the run is not done until they have been retried, and each counts once.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from catalog import runs
from catalog.db import session_scope
from catalog.labels import sync_labels
from catalog.models import activate, register_model
from catalog.runs import create_run, get_run
from catalog.schema import Product, ProductStyle, TagState
from catalog.settings import Settings
from catalog.tags import ProductFailure, ProductTags, Tag, write_batch
from model.taxonomy import load_taxonomy
from worker.producers.retag import mark_running

pytestmark = pytest.mark.chaos

OLD, NEW = "wo-old", "wo-new"


@pytest.fixture
def cat(db_url):
    now = datetime.now(UTC)
    with session_scope(db_url) as s:
        labels = sync_labels(s, load_taxonomy("fashion-mnist"))
        s.execute(insert(Product.__table__), [
            {"sku": f"w{i:03d}", "title": "t", "image_uri": f"file:///img/{i}.png", "image_version": f"v{i}",
             "created_at": now, "updated_at": now} for i in range(6)])
        for version, year in ((OLD, 2024), (NEW, 2025)):  # OLD, the first, is active (bootstrap)
            register_model(s, version, datetime(year, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet-small")
        ids = list(s.scalars(select(Product.id).order_by(Product.id)))
    return db_url, ids, labels


def _tags(labels, pid: int, score: float = 0.9) -> ProductTags:
    return ProductTags(pid, f"v{pid - 1}", [Tag(labels.coarse_ids[5], score, True),
                                            Tag(labels.fine_ids[7], score - 0.1, True)])


def _write(url, model, tagged=(), failed=(), run_id=None):
    with session_scope(url) as s:
        return write_batch(s, run_id=run_id, model_version=model, tagged=list(tagged), failed=list(failed))


def _run(url, total, model=OLD) -> int:
    with session_scope(url) as s:
        run = create_run(s, "manual", "all", model)
        runs.mark_running(s, run.id, total=total)
        return run.id


def _state(url):
    with session_scope(url) as s:
        states = {r.product_id: r for r in s.execute(select(
            TagState.product_id, TagState.status, TagState.run_id, TagState.model_version, TagState.attempts))}
        stamps = dict(s.execute(select(ProductStyle.product_id, ProductStyle.tagged_at)).all())
        return states, stamps


def _counters(url, run_id):
    with session_scope(url) as s:
        run = get_run(s, run_id)
        return run.done, run.failed, run.status


def test_redelivered_batch_of_a_run_is_not_written_again(cat):
    url, ids, labels = cat
    run_id = _run(url, len(ids))
    batch = [_tags(labels, p) for p in ids]
    first = _write(url, OLD, batch, run_id=run_id)
    states, stamps = _state(url)
    again = _write(url, OLD, batch, run_id=run_id)
    assert (first.tagged, again.tagged, again.failed, again.skipped, again.stale) == (6, 0, 0, 0, 0)
    states2, stamps2 = _state(url)
    assert {s.attempts for s in states2.values()} == {1}
    assert stamps2 == stamps and states2 == states
    assert _counters(url, run_id) == (6, 0, "running")
    # Outside a run (uploads) or in another run the product is written again, as before.
    assert _write(url, OLD, batch[:2]).tagged == 2
    run2 = _run(url, 6)
    assert _write(url, OLD, batch, run_id=run2).tagged == 6
    assert _counters(url, run2)[:2] == (6, 0)


def test_stale_redelivery_after_an_upload_neither_regresses_nor_counts_twice(cat):
    url, ids, labels = cat
    run_id = _run(url, len(ids))
    batch = [_tags(labels, p, 0.6) for p in ids]
    _write(url, OLD, batch, run_id=run_id)  # the redelivered copy, first
    _write(url, OLD, [_tags(labels, ids[0], 0.8)])  # an upload (its photo re-read): run_id stays
    states, _ = _state(url)
    assert (states[ids[0]].run_id, states[ids[0]].model_version, states[ids[0]].attempts) == (run_id, OLD, 2)
    out = _write(url, OLD, batch, run_id=run_id)  # the stale first delivery
    assert (out.tagged, out.stale) == (0, 0)
    assert _counters(url, run_id) == (6, 0, "running")
    with session_scope(url) as s:
        scores = sorted(s.scalars(select(ProductStyle.score).where(ProductStyle.product_id == ids[0])))
    assert scores == pytest.approx([0.7, 0.8])
    # Another model activated: the run is superseded; a redelivery of it now writes and counts nothing.
    with session_scope(url) as s:
        activate(s, NEW, by="test")
    assert _counters(url, run_id) == (6, 0, "cancelled")
    before = _state(url)
    out = _write(url, OLD, [_tags(labels, p, 0.5) for p in ids], run_id=run_id)
    assert (out.tagged, out.stale) == (0, 6)
    assert _state(url) == before and _counters(url, run_id) == (6, 0, "cancelled")


def test_resume_counts_retried_failures_once_and_keeps_the_run_open(cat):
    url, ids, labels = cat
    settings = replace(Settings(), database_url=url)
    run_id = _run(url, len(ids))
    _write(url, OLD, [_tags(labels, p) for p in ids[:4]],
           [ProductFailure(p, f"v{p - 1}", "unreachable", "S3 down") for p in ids[4:]], run_id=run_id)
    mark_running(settings, run_id)
    assert _counters(url, run_id) == (4, 2, "done")  # complete, with two failures

    assert mark_running(settings, run_id, retry_failed=True) == 2
    assert _counters(url, run_id) == (4, 0, "running")  # not done until the two are retried
    states, _ = _state(url)
    assert [(states[p].status, states[p].run_id) for p in ids[4:]] == [("failed", None)] * 2
    _write(url, OLD, failed=[ProductFailure(ids[4], "v4", "missing", "gone")], run_id=run_id)
    assert _counters(url, run_id) == (4, 1, "running")
    _write(url, OLD, [_tags(labels, ids[5])], run_id=run_id)
    _write(url, OLD, [_tags(labels, ids[5])], run_id=run_id)  # redelivered: counted once
    mark_running(settings, run_id)
    assert _counters(url, run_id) == (5, 1, "done")
