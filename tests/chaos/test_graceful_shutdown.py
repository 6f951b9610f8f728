"""Fault 5: SIGTERM while a worker processes a chunk.

Two ways a worker is told to stop:
* SIGTERM to the ``styletag worker`` launcher (what ``docker stop`` / Kubernetes send to PID 1): it
  forwards the signal, Celery shuts down warm, the chunk in hand is *finished* and acknowledged, the
  queued chunks stay queued, and the worker exits 0.
* SIGTERM to the whole process group (systemd's default ``KillMode=control-group``): the pool child
  dies at once, Celery rejects its message with requeue (``task_reject_on_worker_lost``), so the chunk
  goes back to the queue *at once* (not after the visibility timeout).

The visibility timeout is left at one hour: had any chunk been left unacknowledged, the run could not
finish within the test. A fresh worker finishes the run; counters exact, tags as a clean run's.
"""

from __future__ import annotations

import os
import signal

import pytest
import redis

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

CHUNK = 2 * BATCH
N = 4 * CHUNK  # whole chunks, so "a chunk was finished" reads as done % CHUNK == 0


def test_sigterm_finishes_or_requeues_the_chunk_in_hand(
        clone_db, chaos_catalog, chaos_broker, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    env = chaos_env(url, chaos_broker, tmp_path, chaos_catalog.store_uri)
    broker = redis.Redis.from_url(chaos_broker)
    first = start_worker(env)
    first.wait_ready(1)
    run_id = retag(env, "--all", "--chunk", str(CHUNK))["id"]
    progress = Progress(url, run_id)
    try:
        # 1. SIGTERM to the launcher while the worker is half-way through a chunk: it finishes it.
        at_term = progress.wait_mid_chunk(CHUNK, at_least=CHUNK)
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(120)
        assert first.proc.returncode == 0, first.text()[-3000:]
        assert "Warm shutdown" in first.text()
        after_term = progress.counts()[0]
        assert after_term % CHUNK == 0 and after_term > at_term  # the chunk in hand was finished
        assert queue_state(broker) == ((N - after_term) // CHUNK, 0)  # the rest queued, none held

        # 2. SIGTERM to the whole group of a second worker mid-chunk: the chunk is requeued at once.
        second = start_worker(env)
        second.wait_ready(1)
        at_group_term = progress.wait_mid_chunk(CHUNK, at_least=after_term + 1)
        os.killpg(second.proc.pid, signal.SIGTERM)
        second.proc.wait(120)
        after_group_term = progress.counts()[0]
        waiting, unacked = queue_state(broker)
        assert unacked == 0
        # Either the child finished its chunk before the signal reached it, or the half-done chunk
        # was put back: every product not done is in a queued chunk.
        assert waiting == -(-(N - after_group_term) // CHUNK), (at_group_term, after_group_term, waiting)

        # 3. A fresh worker finishes the run; no --resume, no visibility timeout needed.
        third = start_worker(env)
        third.wait_ready(1)
        progress.wait_status("done", timeout=180)
    finally:
        progress.close()
    assert_run_exact(url, run_id, N, reference_tags)
    # The third worker wrote exactly the products not yet done: nothing twice, nothing skipped.
    lines = settled_task_lines(third, until=lambda ls: sum(int(ln["tagged"]) for ln in ls) >= N - after_group_term)
    assert sum(int(ln["tagged"]) for ln in lines) == N - after_group_term
    wait_until(lambda: queue_state(broker) == (0, 0), timeout=30)  # the last ack follows the last write
    print(f"\nSIGTERM: launcher at done={at_term} -> finished to {after_term}; group at done={at_group_term} "
          f"-> {after_group_term}, {waiting} chunks queued after; second worker exit {second.proc.returncode}")
