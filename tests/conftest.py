"""Shared fixtures: real services over real connections.

* ``pg_url``: a throwaway PostgreSQL database for the session (schema from ``alembic upgrade head``),
  dropped at the end. ``pg_clean`` / ``db_url`` hand it out truncated, so tests stay independent
  without paying for a migration each.
* ``sqlite_url``: a fresh migrated SQLite file per test (a copy of one migrated template).
* ``s3_server``: a moto S3 server subprocess on a free loopback port (real HTTP, boto3 unchanged),
  configured through boto3's own environment variables.

PostgreSQL: ``STYLETAG_TEST_PG`` (default ``postgresql+psycopg://{root,postgres}@127.0.0.1:5432``).
Without PostgreSQL those tests are skipped, unless ``STYLETAG_TEST_REQUIRE_SERVICES=1`` (CI), where
they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

TABLES = ("product_tag_sets", "tag_set_labels", "tag_sets", "label_pairs", "shadow_tags", "run_failure_counts",
          "product_styles", "style_truth", "tag_state", "tagging_runs", "products",
          "label_parents", "style_labels", "models")
REQUIRE_SERVICES = os.environ.get("STYLETAG_TEST_REQUIRE_SERVICES") == "1"


def _unavailable(reason: str):
    if REQUIRE_SERVICES:
        pytest.fail(reason)
    pytest.skip(reason)


# --- PostgreSQL -------------------------------------------------------------------------------------


def _pg_admin_url() -> str | None:
    """The first server URL (no database) that accepts us; trust auth, user root or postgres."""
    import psycopg

    candidates = [os.environ["STYLETAG_TEST_PG"]] if os.environ.get("STYLETAG_TEST_PG") else [
        "postgresql+psycopg://root@127.0.0.1:5432", "postgresql+psycopg://postgres@127.0.0.1:5432"]
    for base in candidates:
        try:
            with psycopg.connect(_libpq(base, "postgres"), connect_timeout=3):
                return base.rstrip("/")
        except psycopg.Error:
            continue
    return None


def _libpq(base: str, dbname: str) -> str:
    return base.replace("postgresql+psycopg://", "postgresql://", 1).rstrip("/") + "/" + dbname


def drop_pg_database(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(base, "postgres"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    base = _pg_admin_url()
    if base is None:
        _unavailable("PostgreSQL not reachable on 127.0.0.1:5432 (set STYLETAG_TEST_PG)")
    return base


@pytest.fixture(scope="session")
def pg_url(pg_base_url):
    """A migrated throwaway database ``styletag_test_<random>``, dropped at the end of the session."""
    import psycopg

    from catalog.db import engine_for
    from catalog.migrate import upgrade

    name = f"styletag_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{pg_base_url}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        drop_pg_database(pg_base_url, name)


@pytest.fixture
def pg_new_database(pg_base_url):
    """Factory for extra empty (unmigrated) PostgreSQL databases, dropped after the test: for tests
    that must own a whole database, such as a migration round trip."""
    import psycopg

    from catalog.db import engine_for

    made: list[str] = []

    def make() -> str:
        name = f"styletag_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{pg_base_url}/{name}"

    yield make
    for name in made:
        engine_for(f"{pg_base_url}/{name}").dispose()
        drop_pg_database(pg_base_url, name)


def truncate_all(url: str) -> None:
    """Empty every catalog table (keeps the schema): the cheap way to isolate tests on one database."""
    from sqlalchemy import text

    from catalog.db import engine_for

    with engine_for(url).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - fixed table names


@pytest.fixture
def clean_db():
    """The truncate helper, for tests and fixtures that manage their own database."""
    return truncate_all


@pytest.fixture
def pg_clean(pg_url) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    truncate_all(pg_url)
    return pg_url


# --- SQLite -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    from catalog.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "catalog.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(_sqlite_template, tmp_path) -> str:
    """A fresh migrated SQLite catalog for this test."""
    path = tmp_path / "catalog.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    """Run the test on both databases, each empty and migrated."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_clean")


# --- S3 (moto server) -------------------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(n: int = 1) -> int:
    """The first of ``n`` consecutive free loopback ports, chosen below the kernel's ephemeral range: a port the
    test only checked and released, then handed to a server it starts, could otherwise be taken first as the
    local port of some client connection (seen once: a worker's metrics port refused in the smoke test)."""
    import random

    for _ in range(200):
        first = random.randint(20_000, _ephemeral_low() - n)
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def client(self):
        from catalog.storage import s3_client

        return s3_client()

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"styletag-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server subprocess; AWS_* variables point boto3 at it for the session."""
    from catalog.storage import reset_s3_client

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([*argv, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                _unavailable(f"moto_server did not start on port {port}")
            time.sleep(0.1)
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(var, raising=False)
    reset_s3_client()
    try:
        yield S3Server(endpoint=endpoint, process=proc)
    finally:
        mp.undo()
        reset_s3_client()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
