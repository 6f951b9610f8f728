"""Fixtures for the hostile-input, least-privilege and secrets tests (issue 6, items 7-13).

Everything in this package shares, for the package's lifetime:

* ``sec``: a PostgreSQL database of its own (migrated, the model's labels synced), reached through a
  login role with a password (``sec.url``; trust auth accepts any password: the point is that the string
  must never show), a private ``redis-server`` with ``requirepass`` (database 13), a file store and an
  S3 bucket (moto) as the allowed image prefixes, a 200 kB image limit and AWS_SECRET_ACCESS_KEY set.
  ``sec.env`` is the environment of every styletag process started here. STYLETAG_MODEL is *not* set:
  the processes load the default checkpoint (or whatever the developer's environment says).
* ``sec_worker``: one real ``styletag worker --queues bulk`` subprocess (one Celery node, one model).
* ``hostile_catalog``: the image corpus of corpus.py plus hostile URIs and SKUs, tagged twice: inline
  (``styletag retag --all --inline``) and through the worker (``styletag retag --all --wait``), while
  inotify watches every file outside the allowed prefixes and a TCP trap counts connections.

Every styletag command run here is recorded in ``CAPTURED``; test_secrets.py greps all of it (and the
worker's log) for the secrets.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import _libpq, drop_pg_database
from tests.support.redis_server import RedisServer
from tests.support.security import (
    AWS_SECRET,
    BROKER_PASSWORD,
    DB_PASSWORD,
    MAX_IMAGE_BYTES,
    REDIS_DB,
    ConnectionTrap,
    FileWatch,
    Sec,
    SecDB,
    Tagged,
    _build_rows,
    _descendants,
    states,
    styletag,
    vm_hwm_kib,
)
from tests.support.worker import WorkerProcess


@pytest.fixture(scope="package")
def sec_db(pg_base_url) -> SecDB:
    import psycopg
    from sqlalchemy.engine import make_url

    from catalog.db import engine_for, session_scope
    from catalog.labels import sync_labels
    from catalog.migrate import upgrade
    from catalog.settings import Settings
    from model.metadata import CheckpointMeta
    from worker.context import checkpoint_path

    tag = uuid.uuid4().hex[:10]
    name, role = f"styletag_sec_{tag}", f"styletag_secret_test_{tag}"
    with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    admin_url = f"{pg_base_url}/{name}"
    base = make_url(admin_url)
    url = f"postgresql+psycopg://{role}:{DB_PASSWORD}@127.0.0.1:{base.port or 5432}/{name}"
    try:
        upgrade(admin_url)
        with psycopg.connect(_libpq(pg_base_url, name), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{DB_PASSWORD}'")
            conn.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"')
            conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
            conn.execute(f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        # The catalog already knows the model's labels (as after a first retag), so that a checkpoint with
        # different labels under the same taxonomy name is a mismatch, never a first registration.
        taxonomy = CheckpointMeta.read(checkpoint_path(Settings.from_env())).taxonomy
        with session_scope(admin_url) as session:
            sync_labels(session, taxonomy)
        yield SecDB(name=name, role=role, admin_url=admin_url, url=url)
    finally:
        for u in (admin_url, url):
            engine_for(u).dispose()
        drop_pg_database(pg_base_url, name)
        with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


@pytest.fixture(scope="package")
def sec_redis(tmp_path_factory) -> str:
    """A private redis-server that wants a password; returns the broker URL (database 13)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), password=BROKER_PASSWORD, db=REDIS_DB).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="package")
def sec(sec_db, sec_redis, s3_server, tmp_path_factory) -> Sec:
    root = tmp_path_factory.mktemp("sec")
    for sub in ("store", "outside", "store-evil", "home"):
        (root / sub).mkdir()
    bucket = s3_server.make_bucket()
    env = {
        "STYLETAG_DATABASE_URL": sec_db.url,
        "STYLETAG_BROKER_URL": sec_redis,
        "STYLETAG_STORE_URL": (root / "store").as_uri(),
        "STYLETAG_ALLOWED_IMAGE_PREFIXES": f"{(root / 'store').as_uri()}/,s3://{bucket}/images/",
        "STYLETAG_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "STYLETAG_HOME": str(root / "home"),
        "STYLETAG_BATCH_SIZE": "64",
        "STYLETAG_FETCH_THREADS": "4",
        "STYLETAG_TORCH_THREADS": "1",
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "AKIASECURITYTEST0001",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONUNBUFFERED": "1",
    }
    return Sec(env=env, db=sec_db, broker_url=sec_redis, root=root, store=root / "store", outside=root / "outside",
               bucket=bucket)


@pytest.fixture(scope="package")
def sec_worker(sec, tmp_path_factory):
    """One Celery node (bulk queue) for the package; started here, awaited by whoever needs it first."""
    worker = WorkerProcess(sec.env, tmp_path_factory.mktemp("sec-worker") / "worker.log", queues="bulk")
    yield worker
    worker.stop()


@pytest.fixture(scope="package")
def hostile_catalog(sec, sec_worker) -> Tagged:
    from catalog.db import session_scope
    from catalog.schema import Product
    from catalog.storage import s3_client

    trap = ConnectionTrap()
    rows = _build_rows(sec, trap.port, s3_client())
    assert len({r.sku for r in rows}) == len(rows)
    with session_scope(sec.db.admin_url) as s:
        s.add_all(Product(sku=r.sku, title=r.sku[:100], image_uri=r.uri, image_version="v1") for r in rows)
    watch = FileWatch([sec.outside, sec.root / "store-evil"])
    try:
        inline = styletag(sec.env, "retag", "--all", "--inline", "--json")
        assert inline.returncode == 0, inline.stderr[-3000:]
        inline_states = states(sec.db.admin_url)
        sec_worker.wait_ready(1, timeout=180)
        before = _descendants(sec_worker.proc.pid)
        peak_before = {pid: vm_hwm_kib(pid) for pid in before}
        celery = styletag(sec.env, "retag", "--all", "--wait", "--timeout", "180", "--json")
        assert celery.returncode == 0, celery.stderr[-3000:] + sec_worker.text()[-3000:]
        celery_states = states(sec.db.admin_url)
        after = _descendants(sec_worker.proc.pid)
        peak = {pid: vm_hwm_kib(pid) for pid in after}
        reads = watch.events()
    except BaseException:
        watch.close()
        trap.close()
        raise
    yield Tagged(
        rows={r.sku: r for r in rows}, inline=inline, inline_run=json.loads(inline.stdout.strip().splitlines()[-1]),
        inline_states=inline_states, celery=celery, celery_run=json.loads(celery.stdout.strip().splitlines()[-1]),
        celery_states=celery_states, reads_outside=reads, trap=trap, watch=watch, worker_pids_before=before,
        worker_pids_after=after, worker_peak_kib=peak, worker_peak_before_kib=peak_before,
    )
    watch.close()
    trap.close()
