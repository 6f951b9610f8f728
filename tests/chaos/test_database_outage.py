"""Fault 3: the database goes away mid-run. From an admin connection (to another database) the test
makes the catalog refuse new connections (``ALTER DATABASE ... ALLOW_CONNECTIONS false``) and terminates
every connection to it but its own watcher's (``pg_terminate_backend``); five seconds later it lets
connections in again. The worker's tasks fail with OperationalError and retry with backoff; the run
completes exactly. All along, a watcher connection opened before the outage checks that no half-written
batch is ever visible: one snapshot per check, many checks during the outage.
"""

from __future__ import annotations

import re
import time

import psycopg
import pytest

from tests.conftest import _libpq
from tests.support.chaos import (
    BATCH,
    Progress,
    assert_consistent,
    assert_run_exact,
    chaos_env,
    consistency,
    retag,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(900)]

N = 384
CHUNK = 2 * BATCH
OUTAGE_S = 5.0


def test_database_refusing_connections_for_seconds_then_run_completes(
        clone_db, chaos_catalog, chaos_broker, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    base, dbname = url.rsplit("/", 1)
    env = chaos_env(url, chaos_broker, tmp_path, chaos_catalog.store_uri)
    worker = start_worker(env)
    worker.wait_ready(1)

    run = retag(env, "--all", "--chunk", str(CHUNK))
    run_id = run["id"]
    progress = Progress(url, run_id)
    watcher = psycopg.connect(_libpq(base, dbname), autocommit=True)
    admin = psycopg.connect(_libpq(base, "postgres"), autocommit=True)
    checks: list[dict] = []
    terminated = 0
    try:
        progress.wait_mid_chunk(CHUNK, at_least=CHUNK)
        keep = (watcher.info.backend_pid, progress.conn.info.backend_pid)
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
        try:
            terminated = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> ALL(%s)", (dbname, list(keep))).fetchone()[0]
            outage_end = time.monotonic() + OUTAGE_S
            while time.monotonic() < outage_end:
                checks.append(consistency(watcher, run_id))
                time.sleep(0.05)
            with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                psycopg.connect(_libpq(base, dbname)).close()
            during = progress.counts()
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        # Back: keep checking every snapshot until the run is done.
        while progress.counts()[3] != "done":
            checks.append(consistency(watcher, run_id))
            assert worker.proc.poll() is None, worker.text()[-3000:]
            assert len(checks) < 20000, "run did not finish after the outage"
            time.sleep(0.05)
    finally:
        admin.close()
        watcher.close()
        progress.close()

    assert terminated >= 1  # the worker's pooled connections were cut
    for c in checks:
        assert_consistent(c)
    assert during[0] < N  # the outage hit the run while it was going
    assert_run_exact(url, run_id, N, reference_tags)
    retries = re.findall(r"retry: Retry in (\d+)s: (\w+)", worker.text())
    assert retries, worker.text()[-3000:]
    assert {kind for _, kind in retries} <= {"OperationalError", "InterfaceError"}
    print(f"\nDB outage: {terminated} connections terminated, {len(checks)} consistency checks, "
          f"retries (countdown s) {[int(s) for s, _ in retries]}, done during outage {during[0]}/{N}")
