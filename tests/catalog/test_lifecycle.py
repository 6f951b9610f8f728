"""The model lifecycle in the catalog, on SQLite and PostgreSQL: the registry (activate, rollback, retire),
the publishing rule, people's overrides, the review queue, per-run counters and failures by reason, shadow
predictions and their comparison. (The same through real workers: tests/worker/test_lifecycle_worker.py.)"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text, update

from catalog.db import session_scope
from catalog.errors import NotFound
from catalog.models import (
    ModelVersionConflict,
    RegistryError,
    activate,
    active_model,
    get_model,
    list_models,
    previous_model,
    register_model,
    retire,
    rollback,
)
from catalog.overrides import clear_tags, product_tags, set_tag
from catalog.publishing import refresh_published
from catalog.review import accept, queue_size, review_queue
from catalog.runs import create_run, failure_counts, finish_if_complete, get_run, mark_running, run_as_dict
from catalog.schema import Product, ProductStyle, StyleTruth, TaggingRun, TagState
from catalog.shadow import compare, write_shadow_batch
from catalog.tags import ProductFailure, ProductTags, Tag, write_batch

A, B, C = "model-a", "model-b", "model-c"
TAX = "fashion-mnist"


@pytest.fixture
def cat(db_url, seed):
    seeded = seed(db_url, 12)
    with session_scope(db_url) as s:
        for version, month in ((A, 3), (B, 1), (C, 2)):  # B is the *older* model: training time plays no part
            register_model(s, version, datetime(2025, month, 1, tzinfo=UTC), TAX, "resnet-small")
    return seeded


def fine(cat, name):
    return cat.labels.id_for("fine", name)


def coarse(cat, name):
    return cat.labels.id_for("coarse", name)


def pred(cat, pid, fine_name="sneaker", coarse_name="shoes", score=0.9, reason=None):
    return ProductTags(pid, f"v{pid - 1}", [Tag(coarse(cat, coarse_name), score, True),
                                            Tag(fine(cat, fine_name), score - 0.1, True),
                                            Tag(coarse(cat, "tops"), 0.05), Tag(fine(cat, "t-shirt/top"), 0.04)],
                       confidence=score - 0.1, review_reason=reason)


def write(url, model, tagged=(), failed=(), run_id=None):
    """What the pipeline does per batch: the write, then the run's finish check."""
    with session_scope(url) as s:
        out = write_batch(s, run_id=run_id, model_version=model, tagged=list(tagged), failed=list(failed))
        if run_id is not None:
            finish_if_complete(s, run_id)
        return out


def new_run(url, model, total, kind="manual"):
    with session_scope(url) as s:
        run = create_run(s, kind, "all", model)
        mark_running(s, run.id, total=total)
        return run.id


def run_dict(url, run_id):
    with session_scope(url) as s:
        return run_as_dict(get_run(s, run_id))


def shown(url, pid):
    """What the storefront view shows of a product: (level, style, source) of its primary tags."""
    with session_scope(url) as s:
        return sorted(tuple(r) for r in s.execute(text(
            "SELECT level, style, source FROM storefront_tags WHERE product_id = :p AND is_primary"), {"p": pid}))


def sku(pid):
    return f"p{pid - 1:05d}"


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_activation_decides_and_rollback_returns(cat):
    url = cat.url
    with session_scope(url) as s:
        a = get_model(s, A)
        assert (a.status, a.activated_by, a.activation_seq) == ("active", "bootstrap", 1)
        assert [m.status for m in list_models(s)] == ["active", "shadow", "shadow"]
        assert previous_model(s, TAX) is None
        with pytest.raises(RegistryError, match="no earlier active model"):
            rollback(s, by="ann")
    with session_scope(url) as s:
        b = activate(s, B, by="ann")
        assert (b.status, b.activated_by, b.activation_seq) == ("active", "ann", 2)
        assert get_model(s, A).status == "shadow" and previous_model(s, TAX).version == A
        with pytest.raises(NotFound):
            get_model(s, "model-")  # an ambiguous prefix names no model
    with session_scope(url) as s:
        now, before = rollback(s, by="bob")
        assert (now.version, before.version, now.activated_by, now.activation_seq) == (A, B, "bob", 3)
        assert previous_model(s, TAX).version == B
    with session_scope(url) as s:
        retire(s, B, by="ann")
        assert get_model(s, B).status == "retired" and get_model(s, B).meta["retired_by"] == "ann"
        assert previous_model(s, TAX) is None  # a retired model is out of rollback's reach
        with pytest.raises(RegistryError, match="is active"):
            retire(s, A, by="ann")
    with session_scope(url) as s:
        assert activate(s, C, by="ann").status == "active"
        assert s.scalar(select(func.count()).where(text("status = 'active'")).select_from(text("models"))) == 1
        assert active_model(s, TAX).version == C
    with session_scope(url) as s:
        with pytest.raises(ModelVersionConflict, match="trained_at"):
            register_model(s, A, datetime(2020, 1, 1, tzinfo=UTC), TAX, "resnet-small")
    with session_scope(url) as s:
        register_model(s, "model-d", datetime(2025, 1, 1, tzinfo=UTC), TAX, "x", digest="d1")
    with session_scope(url) as s, pytest.raises(ModelVersionConflict, match="other prediction metadata"):
        register_model(s, "model-d", datetime(2025, 1, 1, tzinfo=UTC), TAX, "x", digest="d2")


def test_activation_cancels_the_replaced_models_runs_only(cat):
    url = cat.url
    run_a = new_run(url, A, 12)
    shadow_b = new_run(url, B, 12, kind="shadow")
    with session_scope(url) as s:
        activate(s, B, by="ann")
    assert run_dict(url, run_a)["status"] == "cancelled"
    assert run_dict(url, shadow_b)["status"] == "running"  # a shadow run is no storefront run
    with session_scope(url) as s, pytest.raises(Exception, match="superseded"):
        mark_running(s, run_a, retry_failed=True)  # a superseded run cannot be resumed


def test_rollback_then_retag_puts_the_older_models_tags_back(cat):
    """The issue's rollback: v1 -> v2 -> rollback -> retag: every product carries v1's tags again, though v1
    was trained later than v2 here and earlier in the issue: activation decides."""
    url, ids = cat.url, cat.ids
    run1 = new_run(url, A, len(ids))
    write(url, A, [pred(cat, p, "sneaker") for p in ids], run_id=run1)
    with session_scope(url) as s:
        activate(s, B, by="ann")
    run2 = new_run(url, B, len(ids))
    assert write(url, B, [pred(cat, p, "sandal") for p in ids], run_id=run2).tagged == len(ids)
    with session_scope(url) as s:
        rollback(s, by="ann")
    assert run_dict(url, run2)["status"] == "done"  # finished before the rollback: nothing to cancel
    run3 = new_run(url, A, len(ids))
    out = write(url, A, [pred(cat, p, "sneaker") for p in ids], run_id=run3)
    assert (out.tagged, out.stale) == (len(ids), 0)
    with session_scope(url) as s:
        versions = set(s.scalars(select(ProductStyle.model_version)))
        states = set(s.execute(select(TagState.model_version, TagState.status)).all())
    assert versions == {A} and states == {(A, "tagged")}
    assert all(shown(url, p) == [("coarse", "shoes", "model"), ("fine", "sneaker", "model")] for p in ids)
    info = run_dict(url, run3)
    assert (info["written"], info["failed"], info["skipped"], info["status"]) == (len(ids), 0, 0, "done")


# --- overrides and publishing ------------------------------------------------------------------------------


def test_manual_override_survives_retag_model_change_and_rollback(cat):
    url, ids = cat.url, cat.ids
    pid = ids[0]
    write(url, A, [pred(cat, p) for p in ids])
    with session_scope(url) as s:
        out = set_tag(s, sku(pid), level="fine", style="trouser", by="ann")
    assert out["set"] == [("fine", "trouser"), ("coarse", "bottoms")]
    assert shown(url, pid) == [("coarse", "bottoms", "manual"), ("fine", "trouser", "manual")]
    for model, step in ((A, "retag --all"), (B, "activate B"), (A, "rollback")):
        if step != "retag --all":
            with session_scope(url) as s:
                activate(s, model, by="ann")
        run_id = new_run(url, model, len(ids))
        assert write(url, model, [pred(cat, p, "trouser", "bottoms", 0.6) for p in ids], run_id=run_id).tagged == 12
        assert shown(url, pid) == [("coarse", "bottoms", "manual"), ("fine", "trouser", "manual")], step
        with session_scope(url) as s:
            rows = {(r["level"], r["style"], r["source"], r["published"]) for r in product_tags(s, sku(pid))["tags"]}
        # the person's rows hold the keys of the labels they set; the model's other rows are kept, hidden
        assert rows == {("coarse", "bottoms", "manual", True), ("fine", "trouser", "manual", True),
                        ("coarse", "tops", "model", False), ("fine", "t-shirt/top", "model", False)}, step
    with session_scope(url) as s:
        truth = set(s.execute(select(StyleTruth.label_id, StyleTruth.source).where(StyleTruth.product_id == pid)))
        set_by = set(s.scalars(select(ProductStyle.set_by).where(ProductStyle.source == "manual")))
    assert truth == {(fine(cat, "trouser"), "manual"), (coarse(cat, "bottoms"), "manual")} and set_by == {"ann"}
    # Clearing: the model predicted the same labels, so there is no model primary left: retag picks it up.
    with session_scope(url) as s:
        assert clear_tags(s, sku(pid))["cleared"] == ["coarse", "fine"]
        assert s.get(TagState, pid).model_version == ""
        assert not s.scalars(select(StyleTruth).where(StyleTruth.product_id == pid)).all()
    write(url, A, [pred(cat, pid, "trouser", "bottoms", 0.6)])
    assert shown(url, pid) == [("coarse", "bottoms", "model"), ("fine", "trouser", "model")]


def test_override_of_another_label_shows_the_models_tags_again_when_cleared(cat):
    url, pid = cat.url, cat.ids[1]
    write(url, A, [pred(cat, pid, "sneaker")])
    with session_scope(url) as s:
        set_tag(s, sku(pid), level="fine", style="bag", by="ann")
    assert shown(url, pid) == [("coarse", "bags", "manual"), ("fine", "bag", "manual")]
    with session_scope(url) as s:
        assert clear_tags(s, sku(pid), level="fine")["cleared"] == ["fine"]
    assert shown(url, pid) == [("coarse", "bags", "manual"), ("fine", "sneaker", "model")]
    with session_scope(url) as s:
        clear_tags(s, sku(pid))
        assert s.get(TagState, pid).model_version == A  # the model's primaries were there all along
    assert shown(url, pid) == [("coarse", "shoes", "model"), ("fine", "sneaker", "model")]


def test_the_writer_and_refresh_published_agree(cat):
    """One rule, two spellings: after any write, re-applying the rule changes no row; archiving hides."""
    url, ids = cat.url, cat.ids
    with session_scope(url) as s:
        set_tag(s, sku(ids[2]), level="fine", style="dress", by="ann")
    write(url, A, [pred(cat, p, reason="low_confidence" if p in ids[:4] else None) for p in ids])
    with session_scope(url) as s:
        assert refresh_published(s, ids) == 0
        published = dict(s.execute(select(ProductStyle.product_id, func.count(ProductStyle.label_id))
                                   .where(ProductStyle.published).group_by(ProductStyle.product_id)).all())
    assert ids[0] not in published  # held for review: nothing shown
    assert published[ids[2]] == 2  # held, but the person's two rows are shown
    assert published[ids[5]] == 4
    with session_scope(url) as s:
        s.execute(update(Product).where(Product.id.in_(ids[2:6])).values(archived_at=datetime.now(UTC)))
        assert refresh_published(s, ids) == 2 + 0 + 4 + 4  # the shown rows of products 3 (manual), 4 (held), 5, 6
        assert not s.scalars(select(ProductStyle).where(ProductStyle.product_id.in_(ids[2:6]),
                                                        ProductStyle.published)).all()


# --- review -------------------------------------------------------------------------------------------------


def test_unsure_predictions_are_held_for_review_until_accepted(cat):
    url, ids = cat.url, cat.ids
    run_id = new_run(url, A, len(ids))
    reasons = {ids[0]: ("low_confidence", 0.30), ids[1]: ("out_of_distribution", 0.12), ids[2]: ("low_confidence", 0.41)}
    batch = [pred(cat, p, score=reasons[p][1] + 0.1, reason=reasons[p][0]) if p in reasons else pred(cat, p)
             for p in ids]
    out = write(url, A, batch, run_id=run_id)
    assert (out.tagged, out.review) == (12, 3)
    write(url, A, batch, run_id=run_id)  # redelivered: counted once
    info = run_dict(url, run_id)
    assert (info["written"], info["review"], info["failed"], info["skipped"], info["status"]) == (12, 3, 0, 0, "done")
    with session_scope(url) as s:
        assert queue_size(s) == 3
        queue = review_queue(s)
        states = {r.product_id: (r.status, r.reason) for r in s.scalars(select(TagState))}
    assert [q["sku"] for q in queue] == [sku(ids[1]), sku(ids[0]), sku(ids[2])]  # least confident first
    assert queue[0]["reason"] == "out_of_distribution" and queue[0]["confidence"] == pytest.approx(0.12)
    assert queue[0]["image_uri"] == f"file:///img/{ids[1] - 1}.png"
    assert states[ids[0]] == ("review", "low_confidence") and states[ids[5]] == ("tagged", None)
    assert all(shown(url, p) == [] for p in reasons)
    with session_scope(url) as s:
        out = accept(s, [sku(ids[0]), sku(ids[5])])
    assert out == {"accepted": [sku(ids[0])], "not_in_review": [sku(ids[5])]}
    assert shown(url, ids[0]) == [("coarse", "shoes", "model"), ("fine", "sneaker", "model")]
    with session_scope(url) as s:
        truth = set(s.execute(select(StyleTruth.label_id, StyleTruth.source).where(StyleTruth.product_id == ids[0])))
        assert truth == {(coarse(cat, "shoes"), "review"), (fine(cat, "sneaker"), "review")}
        set_tag(s, sku(ids[1]), level="fine", style="bag", by="ann")  # a correction releases it too
        assert queue_size(s) == 1
    # A person confirmed ids[0]'s labels: an unsure prediction of the same labels is not held again;
    # other labels are (the person did not confirm those).
    run2 = new_run(url, A, 2)
    write(url, A, [pred(cat, ids[0], score=0.2, reason="low_confidence"),
                   pred(cat, ids[1], "ankle boot", score=0.2, reason="low_confidence")], run_id=run2)
    with session_scope(url) as s:
        assert s.get(TagState, ids[0]).status == "tagged"
        assert s.get(TagState, ids[1]).status == "tagged"  # its levels all carry a person's tag
    assert run_dict(url, run2)["review"] == 0
    run3 = new_run(url, A, 1)
    write(url, A, [pred(cat, ids[0], "sandal", score=0.2, reason="low_confidence")], run_id=run3)
    assert run_dict(url, run3)["review"] == 1 and shown(url, ids[0]) == []


# --- counters ---------------------------------------------------------------------------------------------


def test_failures_by_reason_are_counted_exactly_when_failed_is(cat):
    url, ids = cat.url, cat.ids
    run_id = new_run(url, A, 6)
    fails = [ProductFailure(p, "v", "missing", "gone") for p in ids[:3]] + \
        [ProductFailure(ids[3], "v", "unreachable", "down"), ProductFailure(ids[4], "v", "no-such-reason", "?")]
    for _ in range(2):  # redelivered
        write(url, A, failed=fails, run_id=run_id)
    with session_scope(url) as s:
        assert failure_counts(s, run_id) == {"missing": 3, "error": 1, "unreachable": 1}
    write(url, A, failed=[ProductFailure(ids[3], "v", "missing", "now missing")], run_id=run_id)  # reason moves
    write(url, A, [pred(cat, ids[0])], run_id=run_id)  # a failure that later succeeded in the same run
    with session_scope(url) as s:
        assert failure_counts(s, run_id) == {"missing": 3, "error": 1}
        assert get_run(s, run_id).failed == 4
    # Archived since it was enqueued: skipped, once; the run completes.
    with session_scope(url) as s:
        s.execute(update(Product).where(Product.id == ids[5]).values(archived_at=datetime.now(UTC)))
    for _ in range(2):
        write(url, A, [pred(cat, ids[5])], run_id=run_id)
    info = run_dict(url, run_id)
    assert (info["written"], info["failed"], info["skipped"], info["status"]) == (1, 4, 1, "done")
    # A resume detaches the failures from both counters.
    with session_scope(url) as s:
        assert mark_running(s, run_id, retry_failed=True) == 4
        assert failure_counts(s, run_id) == {} and get_run(s, run_id).failed == 0


def test_report_counts_what_the_run_wrote_whatever_later_runs_did(cat):
    from catalog.reports import collect

    url, ids = cat.url, cat.ids
    run1 = new_run(url, A, len(ids))
    write(url, A, [pred(cat, p) for p in ids[:10]], [ProductFailure(p, "v", "missing", "x") for p in ids[10:]],
          run_id=run1)
    run2 = new_run(url, A, len(ids))
    write(url, A, [pred(cat, p, "sandal") for p in ids], run_id=run2)  # touches every product again
    data = collect(url, run1)
    assert {k: data.counts[k] for k in ("total", "written", "failed", "skipped", "review", "remaining")} == {
        "total": 12, "written": 10, "failed": 2, "skipped": 0, "review": 0, "remaining": 0}
    assert [(f["reason"], f["count"]) for f in data.failures] == [("missing", 2)]
    assert collect(url, run2).counts["written"] == 12


# --- shadow -----------------------------------------------------------------------------------------------


def test_shadow_predictions_never_touch_the_storefront_and_compare_exactly(cat):
    url, ids = cat.url, cat.ids
    write(url, A, [pred(cat, p, "sneaker" if p % 3 else "sandal", score=0.8) for p in ids])
    with session_scope(url) as s:  # human labels for 8 products: sneaker for all of them
        s.execute(StyleTruth.__table__.insert(), [{"product_id": p, "label_id": fine(cat, "sneaker"),
                                                   "source": "import", "created_at": datetime.now(UTC)}
                                                  for p in ids[:8]])
    before = (tags_snapshot(url), states_snapshot(url))
    run_id = new_run(url, B, len(ids), kind="shadow")
    batch = [pred(cat, p, "sneaker" if p % 2 else "ankle boot", score=0.7) for p in ids]
    for _ in range(2):  # idempotent, and counted once
        out = _shadow(url, run_id, B, batch[:8])
        assert out.tagged == 8
    _shadow(url, run_id, B, batch[8:])
    assert (tags_snapshot(url), states_snapshot(url)) == before
    info = run_dict(url, run_id)
    assert (info["written"], info["status"]) == (12, "done")
    assert _shadow(url, run_id, B, batch[:2]).stale == 2  # the run is over
    with session_scope(url) as s:
        got = compare(s, B)
        # The same figures, computed independently in SQL.
        sql = s.execute(text(
            "SELECT count(*), sum(CASE WHEN cur.label_id = sh.label_id THEN 1 ELSE 0 END), "
            "sum(CASE WHEN t.label_id = cur.label_id THEN 1 ELSE 0 END), "
            "sum(CASE WHEN t.label_id = sh.label_id THEN 1 ELSE 0 END), count(t.label_id) "
            "FROM product_styles cur JOIN style_labels lc ON lc.id = cur.label_id AND lc.level = 'fine' "
            "JOIN shadow_tags sh ON sh.product_id = cur.product_id AND sh.is_primary AND sh.model_version = :v "
            "JOIN style_labels ls ON ls.id = sh.label_id AND ls.level = 'fine' "
            "LEFT JOIN style_truth t ON t.product_id = cur.product_id "
            "WHERE cur.is_primary AND cur.source = 'model'"), {"v": B}).one()
    f = got["levels"]["fine"]
    assert (f["compared"], f["agree"], f["correct_current"], f["correct_shadow"], f["with_truth"]) == tuple(sql)
    assert (f["compared"], f["agree"], f["with_truth"]) == (12, 4, 8)  # odd ids, not multiples of 3
    assert got["levels"]["coarse"]["agree"] == 12  # sneaker, sandal and ankle boot are all shoes
    assert sum(x["products"] for x in f["flips"]) == 8
    assert f["confidence_shift"] == pytest.approx(-0.1)


def _shadow(url, run_id, model, batch):
    with session_scope(url) as s:
        out = write_shadow_batch(s, run_id=run_id, model_version=model, tagged=batch, failed=[])
        finish_if_complete(s, run_id)
        return out


def tags_snapshot(url):
    with session_scope(url) as s:
        return sorted(tuple(r) for r in s.execute(select(ProductStyle.product_id, ProductStyle.label_id,
                                                         ProductStyle.score, ProductStyle.model_version,
                                                         ProductStyle.published)))


def states_snapshot(url):
    with session_scope(url) as s:
        return sorted(tuple(r) for r in s.execute(select(TagState.product_id, TagState.status, TagState.attempts)))


def test_run_rows_have_the_new_counters(cat):
    with session_scope(cat.url) as s:
        run = create_run(s, "manual", "all", A)
        assert (run.skipped, run.review) == (0, 0)
        assert s.get(TaggingRun, run.id).kind == "manual"


def test_a_run_cancelled_while_its_batch_is_written_gets_nothing(cat, monkeypatch):
    """The writer checks the run twice: before writing (no lock) and when it counts (the run row's lock).
    An activation that cancelled the run in between is seen by the second check: the write raises and the
    caller's rollback leaves nothing behind."""
    import catalog.tags
    from catalog.runs import cancel_run
    from catalog.tags import StaleWrite

    url, ids = cat.url, cat.ids
    run_id = new_run(url, A, len(ids))
    with session_scope(url) as s:
        cancel_run(s, run_id)
    monkeypatch.setattr(catalog.tags, "accepts", lambda *a, **k: True)  # the first check saw it still running
    with pytest.raises(StaleWrite, match=f"run {run_id} was cancelled or finished"):
        write(url, A, [pred(cat, p) for p in ids], [ProductFailure(ids[0], "v", "missing", "x")], run_id=run_id)
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(TagState)) == 0
        assert s.scalar(select(func.count()).select_from(ProductStyle)) == 0
        assert failure_counts(s, run_id) == {}
    assert run_dict(url, run_id)["written"] == 0
