"""Fault 4: the S3 endpoint fails mid-run. The worker reads images from the moto S3 server through a
proxy the test controls: first every request is answered ``503 SlowDown`` for a few seconds, then the
port is closed (connection refused) for a few seconds, then it forwards again. One product's object is
missing from the start.

Expected: chunks whose images are all unreachable are retried by the task with backoff (the run
completes once S3 is back); a product whose image could not be read is recorded as failed with its
reason (``missing``; ``unreachable`` for any caught in a half-failed batch); once the object exists,
``styletag retag --resume RUN`` picks the failed products up again and the run ends as a clean run.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from sqlalchemy import text

from catalog.db import engine_for
from catalog.storage import S3Store, open_store
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

N = 512  # enough chunks left when the faults start (a single ranged GET per image makes fetching quick)
CHUNK = BATCH
PHASE_S = 3.0


def _move_catalog_to_s3(url: str, file_store_uri: str, bucket: str) -> dict[int, tuple[str, bytes]]:
    """Copy the catalog's images into the bucket and point the products at them (same bytes; the
    image_version becomes the object's ETag, what a worker reading it will record)."""
    source = open_store(file_store_uri)
    target = S3Store(bucket, "fmnist")
    objects: dict[int, tuple[str, bytes]] = {}
    with engine_for(url).begin() as conn:
        rows = conn.execute(text("SELECT id, image_uri, image_version FROM products ORDER BY id")).all()
        for pid, uri, _version in rows:
            key = uri.rsplit("/", 1)[1]
            data = source.get(uri)
            info = target.put(key, data, "image/png")
            objects[pid] = (key, data)
            conn.execute(text("UPDATE products SET image_uri = :u, image_version = :v WHERE id = :i"),
                         {"u": target.uri_for(key), "v": info.version, "i": pid})
    return objects


def _retries(worker) -> list[str]:
    """Countdowns of the task retries caused by storage errors, from the worker's log."""
    return re.findall(r"retry: Retry in (\d+)s: TransientStorageError", worker.text())


def test_s3_errors_then_down_then_back_run_completes_and_resume_fixes_failures(
        clone_db, chaos_catalog, chaos_broker, s3_server, faulty_s3, start_worker, reference_tags, tmp_path):
    url = clone_db(N)
    bucket = s3_server.make_bucket()
    objects = _move_catalog_to_s3(url, chaos_catalog.store_uri, bucket)
    missing_id = sorted(objects)[10]  # in the first chunk: read (and found missing) before any fault
    missing_key = objects[missing_id][0]
    s3_server.client().delete_object(Bucket=bucket, Key=f"fmnist/{missing_key}")

    proxy = faulty_s3
    env = chaos_env(url, chaos_broker, tmp_path, f"s3://{bucket}/fmnist",
                    AWS_ENDPOINT_URL=proxy.url,
                    STYLETAG_S3_MAX_ATTEMPTS="1")  # no botocore retries: the task's own retry is what we test
    worker = start_worker(env)
    worker.wait_ready(1)
    run = retag(env, "--all", "--chunk", str(CHUNK))
    run_id = run["id"]
    progress = Progress(url, run_id)
    try:
        progress.wait_mid_chunk(N, at_least=2 * CHUNK)  # a few chunks done, most to go
        checks = []
        for mode in ("error", "down"):
            # Each fault lasts PHASE_S, and until the task has retried at least once because of it
            # (on a slow machine a whole batch must fall inside the fault for the task to retry).
            before = len(_retries(worker))
            proxy.set_mode(mode)
            end, give_up = time.monotonic() + PHASE_S, time.monotonic() + 180
            while time.monotonic() < end or len(_retries(worker)) == before:
                assert time.monotonic() < give_up, f"no task retry while S3 was {mode}"
                checks.append(consistency(progress.conn, run_id))
                time.sleep(0.1)
        during = progress.counts()
        proxy.set_mode("forward")
        done, failed, total, status = progress.wait_status("done", timeout=240)
    finally:
        progress.close()
    assert worker.proc.poll() is None

    for c in checks:
        assert_consistent(c)
    assert proxy.served["error"] >= 1  # the worker did meet the 503s
    assert during[0] + during[1] < N  # and the outage hit the run while it was going
    # Transient errors were retried by the task, with backoff, and the run completed.
    retries = _retries(worker)
    assert len(retries) >= 2, worker.text()[-3000:]
    assert total == N and done + failed == N and failed >= 1
    with engine_for(url).connect() as conn:
        failures = conn.execute(text(
            "SELECT product_id, reason, error FROM tag_state WHERE status = 'failed' ORDER BY product_id")).all()
        no_tags = conn.execute(text(
            "SELECT count(*) FROM product_styles WHERE product_id IN "
            "(SELECT product_id FROM tag_state WHERE status = 'failed')")).scalar()
    assert len(failures) == failed
    by_id = {pid: (reason, error) for pid, reason, error in failures}
    assert by_id[missing_id][0] == "missing" and missing_key in by_id[missing_id][1]
    assert {reason for reason, _ in by_id.values()} <= {"missing", "unreachable"}
    assert no_tags == 0  # a failed product has no half-written tags

    # The image is put back; resume picks up every failed product.
    s3_server.client().put_object(Bucket=bucket, Key=f"fmnist/{missing_key}", Body=objects[missing_id][1])
    resumed = retag(env, "--resume", str(run_id), "--chunk", str(CHUNK), "--wait", "--timeout", "120")
    assert resumed["status"] == "done"
    assert_run_exact(url, run_id, N, reference_tags)
    # A nightly --changed-only run afterwards finds nothing left to do.
    nightly = retag(env, "--changed-only", "--wait", "--timeout", "60")
    assert (nightly["total"], nightly["status"]) == (0, "done")
    print(f"\nS3 faults: {proxy.served['error']} connections answered 503, {len(retries)} task retries "
          f"(countdowns {[int(s) for s in retries]}), {failed} failed before resume "
          f"({sorted(Counter(reason for reason, _ in by_id.values()).items())})")
