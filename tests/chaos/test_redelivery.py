"""Fault 6: a task slower than the visibility timeout is delivered a second time while the first
delivery is still running.

Two workers, visibility timeout 4 s, and the test-only hook ``tests/hooks/slow_first_delivery`` (through
PYTHONPATH, not in styletag's code): a first delivery waits (until the test creates the gate file) before
working; a redelivered one does not. So the chunk's message is taken by one worker, given back to the
queue by the visibility sweep after 4 s and run by the other worker, which writes the chunk; then the
test opens the gate and the first delivery writes the same chunk again, stale.

Meanwhile a newer model (later ``trained_at``) has tagged some products: some before the run started,
some *between* the two writes (through the uploads path, which belongs to no run). The stale write
must change nothing: no product counted twice, no row written twice, no newer tag regressed, and the
older model's run still finishes.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import text

from catalog.db import engine_for, session_scope
from catalog.models import register_model
from catalog.tags import ProductTags, Tag, write_batch
from tests.chaos.conftest import (
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
from tests.hooks import slow_first_delivery_env
from tests.worker.conftest import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

N = 128
VISIBILITY_TIMEOUT = 4
DELAY = 300  # upper bound of the wait; the gate ends it
NEWER = "chaos-newer-model"
BEFORE_RUN = [2, 40, 80, 120]  # product ids tagged by the newer model before the run
BETWEEN_WRITES = [10, 60, 100, 125]  # ... and between the fresh and the stale write


def _tag_with_newer_model(url: str, ids: list[int]) -> None:
    """What an uploads worker running a newer checkpoint writes (run_id None)."""
    with session_scope(url) as s:
        register_model(s, NEWER, datetime(2100, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet-small")
        labels = dict(s.execute(text("SELECT level || ':' || name, id FROM style_labels")).all())
        versions = dict(s.execute(text("SELECT id, image_version FROM products WHERE id = ANY(:ids)"),
                                  {"ids": ids}).all())
        tags = [Tag(labels["coarse:bags"], 0.99, True), Tag(labels["fine:bag"], 0.97, True)]
        out = write_batch(s, run_id=None, model_version=NEWER,
                          tagged=[ProductTags(pid, versions[pid], tags) for pid in ids], failed=[])
        assert out.tagged == len(ids)


def test_redelivery_after_visibility_timeout_writes_once_and_keeps_newer_tags(
        clone_db, chaos_catalog, chaos_broker, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    _tag_with_newer_model(url, BEFORE_RUN)
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
        _tag_with_newer_model(url, BETWEEN_WRITES)
        gate.touch()
        wait_until(lambda: any(ln["redelivered"] == "False" for ln in task_lines(*workers)),
                   timeout=120, interval=0.2)
        assert_consistent(consistency(progress.conn, run_id))
        final = progress.counts()
    finally:
        progress.close()

    newer = sorted(BEFORE_RUN + BETWEEN_WRITES)
    lines = task_lines(*workers)
    (stale,) = [ln for ln in lines if ln["redelivered"] == "False"]
    fresh = [ln for ln in lines if ln["redelivered"] == "True"]  # one, or more if it too outlived the timeout
    assert sum(int(ln["tagged"]) for ln in fresh) == N - len(BEFORE_RUN)
    assert (int(stale["tagged"]), int(stale["failed"]), int(stale["skipped_newer"])) == (0, 0, len(newer))
    assert final == (N, 0, N, "done")  # counted once, the older model's run finished

    with engine_for(url).connect() as conn:
        states = conn.execute(text(
            "SELECT product_id, status, run_id, model_version, attempts FROM tag_state ORDER BY product_id")).all()
        newer_tags = conn.execute(text(
            "SELECT s.product_id, l.level, l.name, s.score, s.is_primary FROM product_styles s "
            "JOIN style_labels l ON l.id = s.label_id WHERE s.model_version = :m ORDER BY 1, 2"), {"m": NEWER}).all()
    assert len(states) == N and {(r.status, r.run_id) for r in states} == {("tagged", run_id)}
    assert [r.product_id for r in states if r.model_version == NEWER] == newer
    # Written once: the older model's rows were upserted one time (the stale delivery wrote nothing);
    # the products of BETWEEN_WRITES were written by the older model once, then by the newer one.
    attempts = {r.product_id: r.attempts for r in states}
    assert {attempts[p] for p in BEFORE_RUN} == {1}
    assert {attempts[p] for p in BETWEEN_WRITES} == {2}
    assert {a for p, a in attempts.items() if p not in newer} == {1}
    assert [tuple(r) for r in newer_tags] == [t for p in newer for t in
                                              ((p, "coarse", "bags", 0.99, True), (p, "fine", "bag", 0.97, True))]
    got = tags_by_sku(url)
    with engine_for(url).connect() as conn:
        newer_skus = set(conn.execute(text("SELECT sku FROM products WHERE id = ANY(:ids)"), {"ids": newer}).scalars())
    assert_same_tags({k: v for k, v in got.items() if k not in newer_skus},
                     {k: v for k, v in reference_tags.items() if k in got and k not in newer_skus})
    print("\nredelivery: "
          f"{len(fresh)} redelivered execution(s) {fresh}, stale {stale}")
