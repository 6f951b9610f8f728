"""Fault 6: a task slower than the visibility timeout is delivered a second time while the first
delivery is still running.

Two workers, visibility timeout 4 s, and the test-only hook ``tests/hooks/slow_first_delivery`` (through
PYTHONPATH, not in styletag's code): a first delivery waits (until the test creates the gate file) before
working; a redelivered one does not. So the chunk's message is taken by one worker, given back to the
queue by the visibility sweep after 4 s and run by the other worker, which writes the chunk and finishes
the run; then the test opens the gate and the first delivery tries to write the same chunk again, stale.

Meanwhile a person corrected some products' tags by hand (``catalog.overrides``): some before the run
started, some *between* the two writes. The stale write must change nothing: no product counted twice,
no row written twice, no person's tag touched, and the run finishes exactly once.
"""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import text

from catalog.db import engine_for, session_scope
from catalog.overrides import set_tag
from tests.hooks import slow_first_delivery_env
from tests.support.chaos import (
    Progress,
    assert_consistent,
    assert_same_tags,
    chaos_env,
    consistency,
    queue_state,
    retag,
    tags_by_sku,
    task_lines,
)
from tests.support.worker import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

N = 128
VISIBILITY_TIMEOUT = 4
DELAY = 300  # upper bound of the wait; the gate ends it
BEFORE_RUN = [2, 40, 80, 120]  # product ids a person corrected before the run
BETWEEN_WRITES = [10, 60, 100, 125]  # ... and between the fresh and the stale write


def _correct_by_hand(url: str, ids: list[int]) -> None:
    """A person sets the fine style 'bag' (coarse 'bags' follows) on these products."""
    with session_scope(url) as s:
        skus = dict(s.execute(text("SELECT id, sku FROM products WHERE id = ANY(:ids)"), {"ids": ids}).all())
        for pid in ids:
            out = set_tag(s, skus[pid], level="fine", style="bag", by="chaos-test")
            assert out["set"] == [("fine", "bag"), ("coarse", "bags")]


def test_redelivery_after_visibility_timeout_writes_once_and_keeps_manual_tags(
        clone_db, chaos_catalog, chaos_broker, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    _correct_by_hand(url, BEFORE_RUN)
    gate = tmp_path / "gate"
    env = chaos_env(url, chaos_broker, tmp_path, chaos_catalog.store_uri,
                    STYLETAG_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT), **slow_first_delivery_env(DELAY, gate))
    workers = [start_worker(env), start_worker(env)]
    for w in workers:
        w.wait_ready(1)

    run = retag(env, "--all", "--chunk", str(N))  # one message
    run_id = run["id"]
    assert run["total"] == N, run
    broker = redis.Redis.from_url(chaos_broker)
    assert sum(queue_state(broker)) <= 1, (queue_state(broker), broker.lrange("bulk", 0, -1),
                                           broker.hvals("unacked"))
    progress = Progress(url, run_id)
    try:
        progress.wait_status("done", timeout=120)
        lines = wait_until(lambda: task_lines(*workers), timeout=60)  # logged just after the commit
        assert {ln["redelivered"] for ln in lines} == {"True"}, lines  # the first delivery still waits
        assert_consistent(consistency(progress.conn, run_id))
        _correct_by_hand(url, BETWEEN_WRITES)
        gate.touch()
        wait_until(lambda: any(ln["redelivered"] == "False" for ln in task_lines(*workers)),
                   timeout=120, interval=0.2)
        assert_consistent(consistency(progress.conn, run_id))
        final = progress.counts()
    finally:
        progress.close()

    manual = sorted(BEFORE_RUN + BETWEEN_WRITES)
    lines = task_lines(*workers)
    (stale,) = [ln for ln in lines if ln["redelivered"] == "False"]
    fresh = [ln for ln in lines if ln["redelivered"] == "True"]  # one, or more if it too outlived the timeout
    assert sum(int(ln["tagged"]) for ln in fresh) == N  # the model's tags of corrected products are kept too
    # The run was finished: the stale delivery wrote nothing and counted nowhere.
    assert (int(stale.get("tagged", 0)), int(stale.get("failed", 0)), int(stale["stale"])) == (0, 0, N), stale
    assert final == (N, 0, N, "done")  # counted once

    with engine_for(url).connect() as conn:
        states = conn.execute(text(
            "SELECT product_id, status, run_id, model_version, attempts FROM tag_state ORDER BY product_id")).all()
        manual_rows = conn.execute(text(
            "SELECT s.product_id, l.level, l.name, s.score, s.is_primary, s.set_by, s.published FROM product_styles s "
            "JOIN style_labels l ON l.id = s.label_id WHERE s.source = 'manual' ORDER BY 1, 2")).all()
        shown = conn.execute(text(
            "SELECT product_id, level, style, source FROM storefront_tags WHERE is_primary AND product_id = ANY(:ids) "
            "ORDER BY 1, 2"), {"ids": manual}).all()
    assert len(states) == N and {(r.status, r.run_id, r.model_version) for r in states} == {
        ("tagged", run_id, run["model_version"])}
    assert {r.attempts for r in states} == {1}  # written once: the stale delivery wrote nothing
    assert [tuple(r) for r in manual_rows] == [t for p in manual for t in
                                               ((p, "coarse", "bags", 1.0, True, "chaos-test", True),
                                                (p, "fine", "bag", 1.0, True, "chaos-test", True))]
    # The storefront shows the person's tags as the primary ones of the corrected products.
    assert [tuple(r) for r in shown] == [t for p in manual for t in ((p, "coarse", "bags", "manual"),
                                                                     (p, "fine", "bag", "manual"))]
    got = tags_by_sku(url)
    with engine_for(url).connect() as conn:
        manual_skus = set(conn.execute(text("SELECT sku FROM products WHERE id = ANY(:ids)"), {"ids": manual}).scalars())
    assert_same_tags({k: v for k, v in got.items() if k not in manual_skus},
                     {k: v for k, v in reference_tags.items() if k in got and k not in manual_skus})
    # Corrected products keep the model's rows (hidden) beside the person's, except a label the person set.
    for sku in manual_skus:
        model_rows = [r for r in got[sku] if r[3] != "manual"]
        ref = [r for r in reference_tags[sku] if r[1] not in ("bag", "bags")]
        assert [r[:4] for r in model_rows if r[1] not in ("bag", "bags")] == [r[:4] for r in ref], sku
    print("\nredelivery: "
          f"{len(fresh)} redelivered execution(s) {fresh}, stale {stale}")
