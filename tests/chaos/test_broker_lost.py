"""Fault 2: the broker is lost mid-run. A private ``redis-server`` that keeps nothing on disk is
SIGKILLed while the worker is busy and restarted empty on the same port: every queued and unacknowledged
message is gone. The worker reconnects by itself; ``styletag retag --resume RUN --wait`` re-enqueues
what the database says is unfinished and the run ends exactly as a clean run does.
"""

from __future__ import annotations

import time

import pytest

from tests.support.chaos import (
    BATCH,
    Progress,
    assert_run_exact,
    chaos_env,
    queue_state,
    retag,
    settled_task_lines,
)
from tests.support.worker import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

N = 384
CHUNK = BATCH


def test_broker_killed_and_restarted_empty_then_resume_finishes_the_run(
        clone_db, chaos_catalog, private_redis, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    env = chaos_env(url, private_redis.url, tmp_path, chaos_catalog.store_uri)
    worker = start_worker(env)
    worker.wait_ready(1)

    run = retag(env, "--all", "--chunk", str(CHUNK))
    run_id = run["id"]
    assert run["total"] == N and run["status"] == "running"
    progress = Progress(url, run_id)
    try:
        progress.wait_mid_chunk(2 * CHUNK, at_least=CHUNK)
        waiting, unacked = queue_state(private_redis.client())
        assert waiting > 0 and unacked <= 1  # chunks queued, one (or, between two, none) in the worker's hands
        private_redis.kill()  # SIGKILL: nothing saved
        time.sleep(1.0)
        private_redis.start()  # same port, empty
        # Empty; at most the chunk in flight, should the worker have put it back after the restart.
        assert sum(queue_state(private_redis.client())) <= 1
        # The worker reconnects to the new server by itself.
        wait_until(lambda: worker.text().count("Connected to redis://") >= 2, timeout=60, interval=0.2)
        assert worker.proc.poll() is None

        # What was in flight finishes; then nothing moves: the queued chunks are gone.
        done, failed, total, status = progress.wait_stable(quiet=3.0)
        assert status == "running" and done + failed < total

        resumed = retag(env, "--resume", str(run_id), "--chunk", str(CHUNK), "--wait", "--timeout", "180")
    finally:
        progress.close()

    assert resumed["id"] == run_id and resumed["status"] == "done"
    assert_run_exact(url, run_id, N, reference_tags)
    lines = settled_task_lines(worker, until=lambda ls: sum(int(ln["tagged"]) for ln in ls) >= N)
    assert sum(int(ln["tagged"]) for ln in lines) == N  # each product written by exactly one task
    wait_until(lambda: queue_state(private_redis.client()) == (0, 0), timeout=30)  # the last ack follows the last write
    print(f"\nbroker lost: killed with {waiting} chunks queued and {unacked} unacked; run stalled at "
          f"done={done}/{N}; resume re-enqueued {N - done} products; {len(lines)} tasks in all")
