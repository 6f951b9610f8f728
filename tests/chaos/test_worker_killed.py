"""Fault 1: a worker SIGKILLed (whole process group) while it holds a chunk; another worker finishes.

The chunk the dead worker held stays unacknowledged in Redis; after the visibility timeout (10 s here)
the new worker's sweep puts it back on the queue and it is tagged again. Half of it was already written
by the dead worker: the second delivery must neither count those products again nor write them again.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from sqlalchemy import text

from catalog.db import engine_for
from tests.support.chaos import (
    BATCH,
    CATALOG_N,
    Progress,
    assert_run_exact,
    chaos_env,
    queue_state,
    retag,
    settled_task_lines,
)
from tests.support.worker import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

CHUNK = 2 * BATCH  # 128 ids per message: two batches, so "inside a chunk" is observable
VISIBILITY_TIMEOUT = 10


def test_worker_killed_mid_batch_loses_nothing_and_writes_nothing_twice(
        clone_db, chaos_catalog, chaos_broker, start_worker, reference_tags, tmp_path):
    url = clone_db(CATALOG_N)
    env = chaos_env(url, chaos_broker, tmp_path, chaos_catalog.store_uri,
                    STYLETAG_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT))
    broker = redis.Redis.from_url(chaos_broker)
    first = start_worker(env)
    first.wait_ready(1)

    run = retag(env, "--all", "--chunk", str(CHUNK))
    run_id = run["id"]
    assert run["total"] == CATALOG_N
    progress = Progress(url, run_id)
    try:
        # Kill when the worker has written the first batch of a chunk and computes the second: freeze
        # its process group, check the counter (it may have moved on meanwhile), then SIGKILL.
        while True:
            progress.wait_mid_chunk(CHUNK, at_least=3 * CHUNK)
            os.killpg(first.proc.pid, signal.SIGSTOP)
            done_at_kill = progress.counts()[0]
            if done_at_kill % CHUNK == BATCH:
                break
            os.killpg(first.proc.pid, signal.SIGCONT)
        first.stop(signal.SIGKILL)
        assert first.proc.returncode == -signal.SIGKILL
        time.sleep(0.5)  # a commit the server had already received when the group froze is in by now
        done, failed, total, status = progress.counts()
        assert status == "running" and done < total
        assert done % CHUNK == BATCH  # the killed chunk is half written, not finished by a survivor
        waiting, unacked = queue_state(broker)
        assert unacked == 1  # the chunk the dead worker held, waiting for its visibility timeout
        assert waiting == -(-(CATALOG_N - done - BATCH) // CHUNK)  # every other chunk still queued

        second = start_worker(env)
        second.wait_ready(1)
        progress.wait_status("done", timeout=240)
    finally:
        progress.close()

    info = assert_run_exact(url, run_id, CATALOG_N, reference_tags)
    assert info["done"] == CATALOG_N and info["failed"] == 0
    # Written once: every tag_state row was upserted exactly one time, including the half chunk that
    # the dead worker had written before its message was delivered again.
    with engine_for(url).connect() as conn:
        attempts = dict(conn.execute(text("SELECT attempts, count(*) FROM tag_state GROUP BY attempts")).all())
    assert attempts == {1: CATALOG_N}
    lines = settled_task_lines(second, until=lambda ls: sum(int(ln["tagged"]) for ln in ls) >= CATALOG_N - done)
    redelivered = [ln for ln in lines if ln["redelivered"] == "True"]
    assert len(redelivered) == 1 and int(redelivered[0]["tagged"]) == BATCH  # only the unwritten half
    assert sum(int(ln["tagged"]) for ln in lines) == CATALOG_N - done
    wait_until(lambda: queue_state(broker) == (0, 0), timeout=30)  # the last ack follows the last write
    print(f"\nworker killed: SIGKILL at done={done}/{CATALOG_N} with 1 chunk unacked and {waiting} queued; "
          f"second worker ran {len(lines)} tasks, the redelivered one wrote {redelivered[0]['tagged']} of {CHUNK}")
