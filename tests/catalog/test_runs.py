"""Runs: keyset pages return every product of the run exactly once, and resume/changed-only skip
exactly what is already final."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from catalog.db import session_factory, session_scope
from catalog.errors import NotFound
from catalog.models import register_model
from catalog.runs import (
    create_run,
    finish_if_complete,
    get_run,
    iter_products_to_tag,
    list_runs,
    mark_running,
    run_as_dict,
)
from catalog.schema import Product
from catalog.tags import ProductFailure, ProductTags, Tag, write_batch

MODEL = "m1"


@pytest.fixture
def cat(db_url, seed):
    seeded = seed(db_url, 2500)
    with session_scope(db_url) as s:
        register_model(s, MODEL, datetime(2025, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
        register_model(s, "m2", datetime(2025, 2, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
    return seeded


def _run(url, scope="all", model=MODEL):
    with session_scope(url) as s:
        return create_run(s, "manual", scope, model)


def _pages(url, run, **kw):
    return list(iter_products_to_tag(session_factory(url), run, **kw))


def _tag(url, run_id, ids, model=MODEL, fail=()):
    with session_scope(url) as s:
        lm_id = 1
        write_batch(s, run_id=run_id, model_version=model,
                    tagged=[ProductTags(p, f"v{p - 1}", [Tag(lm_id, 0.9, True)]) for p in ids if p not in fail],
                    failed=[ProductFailure(p, None, "missing", "gone") for p in fail])


def test_every_product_exactly_once(cat):
    run = _run(cat.url)
    assert run.max_product_id == max(cat.ids) and run.status == "enqueuing"
    seed_more = cat.ids[-1]
    pages = _pages(cat.url, run, page=1000)
    assert [len(p) for p in pages] == [1000, 1000, 500]
    flat = [i for p in pages for i in p]
    assert flat == sorted(cat.ids) and len(set(flat)) == len(flat)
    # Products created after the run started are not part of it.
    with session_scope(cat.url) as s:
        s.add(Product(sku="late", title="", image_uri="file:///img/late.png"))
    assert [i for p in _pages(cat.url, run, page=700) for i in p] == flat
    assert seed_more == run.max_product_id


def test_resume_skips_final_products(cat):
    run = _run(cat.url)
    done, failed = cat.ids[:1200], cat.ids[1200:1300]
    _tag(cat.url, run.id, done + failed, fail=set(failed))
    todo = [i for p in _pages(cat.url, run, page=333) for i in p]
    assert todo == cat.ids[1300:]
    with_failed = [i for p in _pages(cat.url, run, page=333, include_failed=True) for i in p]
    assert with_failed == cat.ids[1200:]


def test_changed_scope(cat):
    first = _run(cat.url)
    _tag(cat.url, first.id, cat.ids)  # image_version v{id-1} matches products.image_version
    with session_scope(cat.url) as s:
        s.execute(update(Product).where(Product.id.in_(cat.ids[:3])).values(image_version="changed"))
        s.execute(update(Product).where(Product.id == cat.ids[3]).values(image_version=None))
    changed = _run(cat.url, scope="changed")
    assert [i for p in _pages(cat.url, changed) for i in p] == cat.ids[:4]
    newer_model = _run(cat.url, scope="changed", model="m2")
    assert sum(len(p) for p in _pages(cat.url, newer_model)) == len(cat.ids)


def test_get_list_and_dict(cat):
    run = _run(cat.url)
    with session_scope(cat.url) as s:
        mark_running(s, run.id, total=10)
    with session_scope(cat.url) as s:
        info = run_as_dict(get_run(s, run.id))
        assert info["status"] == "running" and info["total"] == 10 and info["remaining"] == 10
        assert [r.id for r in list_runs(s, 5)] == [run.id]
        with pytest.raises(NotFound):
            get_run(s, run.id + 1)
    with pytest.raises(ValueError), session_scope(cat.url) as s:
        create_run(s, "weekly", "all", MODEL)


def test_resume_counts_what_a_dead_producer_never_enqueued(cat):
    """The producer grows a run's total page by page; killed after the first page, the run's total is
    short. ``retag --resume`` recounts it, so the run ends done only when every product is tagged."""
    from dataclasses import replace

    from catalog.settings import Settings
    from worker.producers.retag import enqueue_run
    from worker.producers.retag import start_run as start

    settings = replace(Settings.from_env(), database_url=cat.url)
    run_id = start(settings, scope="all", model_version=MODEL)
    sent: list[int] = []

    def dying(_task, args, queue):
        if len(sent) >= 1000:
            raise RuntimeError("producer killed")
        sent.extend(args[1])

    with pytest.raises(RuntimeError):
        enqueue_run(settings, run_id, chunk=500, send=dying)
    with session_scope(cat.url) as s:
        assert get_run(s, run_id).total == 2000  # two pages counted; the last 500 were never reached
    _tag(cat.url, run_id, sent[:600], fail=set(sent[590:600]))  # workers did part of what was sent
    resumed: list[int] = []
    enqueue_run(settings, run_id, resume=True, chunk=500, send=lambda _t, args, queue: resumed.extend(args[1]))
    with session_scope(cat.url) as s:
        run = get_run(s, run_id)
        assert (run.total, run.done, run.failed, run.status) == (2500, 590, 0, "running")
    assert sorted(resumed) == sorted(set(cat.ids) - set(sent[:590]))  # the 10 failed are retried
    _tag(cat.url, run_id, resumed)
    with session_scope(cat.url) as s:
        assert finish_if_complete(s, run_id)  # as the pipeline does after each batch
    with session_scope(cat.url) as s:
        run = get_run(s, run_id)
        assert (run.total, run.done, run.failed, run.status) == (2500, 2500, 0, "done")
