"""Fixtures for the fault tests: real worker processes, a real broker, database and object store, and
tools to break each of them on purpose.

* ``chaos_catalog``: a PostgreSQL *template* database holding 2,000 Fashion-MNIST test products (28 px
  PNGs in a file store), imported once per session; every test gets its own copy (``clone_db``,
  ``CREATE DATABASE ... TEMPLATE``: about a second) cut down to the size it needs.
* ``reference_tags``: what a clean run gives, computed once with the inline pipeline (same checkpoint,
  same images, same batch size) on another copy. Every fault test ends by comparing with it.
* ``chaos_broker``: a private ``redis-server`` per test (:class:`RedisServer`, which a test may also
  kill), so that concurrent sessions never share a queue; database 12 of the shared server without
  the binary.
* ``start_worker``: real ``styletag worker --gpus none --queues bulk`` processes (launcher + Celery main
  + one pool child), each in its own process group, killed at teardown whatever happened.
* :class:`FaultyEndpoint`: a TCP proxy in front of the moto S3 server that can forward, answer every
  request with ``503 SlowDown``, or be down (port closed, connection refused).

The model is the default checkpoint (``STYLETAG_MODEL`` as the environment has it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import replace

import psycopg
import pytest
import redis

from catalog.db import engine_for
from tests.conftest import _libpq
from tests.support.chaos import (
    BATCH,
    CATALOG_N,
    REDIS_DB,
    ChaosCatalog,
    ChaosWorker,
    _clone,
    _drop,
    tags_by_sku,
)
from tests.support.redis_server import RedisServer
from tests.support.s3_proxy import FaultyEndpoint
from tests.support.worker import WorkerProcess


@pytest.fixture(scope="session")
def chaos_catalog(pg_base_url, tmp_path_factory) -> ChaosCatalog:
    from catalog.importers import import_fashion_mnist
    from catalog.migrate import upgrade

    store_dir = tmp_path_factory.mktemp("chaos-images")
    name = f"styletag_chaos_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    cat = ChaosCatalog(pg_base_url, name, store_dir, store_dir.as_uri())
    try:
        url = cat.url(name)
        upgrade(url)
        import_fashion_mnist(url, cat.store_uri, "test", limit=CATALOG_N, size=28, progress=False)
        engine_for(url).dispose()  # a template must have no connections when it is copied
        yield cat
    finally:
        _drop(cat, name)


@pytest.fixture
def clone_db(chaos_catalog):
    """Factory: ``clone_db(n)`` -> URL of a private copy of the catalog with n products."""
    made: list[str] = []

    def make(n: int) -> str:
        name, url = _clone(chaos_catalog, n)
        made.append(name)
        return url

    yield make
    for name in made:
        _drop(chaos_catalog, name)


@pytest.fixture(scope="session")
def reference_tags(chaos_catalog) -> dict[str, list[tuple]]:
    """The clean run: the inline pipeline over all 2,000 products, nothing broken."""
    from catalog.settings import Settings
    from worker.context import reset_context
    from worker.producers.retag import run_inline, start_run

    name, url = _clone(chaos_catalog, CATALOG_N)
    settings = replace(Settings.from_env(), database_url=url, store_url=chaos_catalog.store_uri,
                       allowed_image_prefixes=(chaos_catalog.store_uri + "/",), batch_size=BATCH, fetch_threads=4)
    reset_context()
    try:
        run_id = start_run(settings, scope="all")
        report = run_inline(settings, run_id, progress=False)
        assert (report.tagged, report.failed) == (CATALOG_N, 0)
        return tags_by_sku(url)
    finally:
        reset_context()
        _drop(chaos_catalog, name)


@pytest.fixture
def chaos_broker(tmp_path_factory) -> str:
    """A broker of this test's own: a private redis-server on a free port (so that two sessions running
    these tests at once cannot take each other's messages), or, without the binary, database 12 of the
    shared server, emptied before and after."""
    if shutil.which("redis-server") is not None:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
        try:
            yield server.url
        finally:
            server.kill()
        return
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def start_worker(tmp_path):
    """Factory: ``start_worker(env)`` starts ``styletag worker --gpus none --queues bulk`` (not waiting);
    every worker still alive at teardown is SIGKILLed with its whole process group."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        w = ChaosWorker(env, tmp_path / f"worker-{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            w.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        w.log.close()


@pytest.fixture
def faulty_s3(s3_server):
    """A :class:`FaultyEndpoint` in front of the session's moto server, closed after the test."""
    proxy = FaultyEndpoint(s3_server.endpoint)
    yield proxy
    proxy.close()
