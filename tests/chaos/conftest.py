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
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text

from catalog.db import engine_for, session_scope
from tests.conftest import _libpq, drop_pg_database, free_port
from tests.worker.conftest import WorkerProcess, run_cli, wait_until

REDIS_DB = 12
CATALOG_N = 2000
BATCH = 64  # images per model call in every run here (small, so a chunk holds several batches)
SCORE_TOL = 1e-4  # scores may differ in the last float bits when a batch is composed differently


# --- the catalog --------------------------------------------------------------------------------------


@dataclass
class ChaosCatalog:
    base: str  # server URL without a database
    template: str  # name of the template database
    store_dir: Path
    store_uri: str  # file:///... of the image folder

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


def _clone(cat: ChaosCatalog, n: int) -> tuple[str, str]:
    """A copy of the template holding its first ``n`` products (ids 1..n)."""
    name = f"styletag_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(cat.base, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{cat.template}"')
    url = cat.url(name)
    if n < CATALOG_N:
        with engine_for(url).begin() as conn:
            conn.execute(text("DELETE FROM products WHERE id NOT IN (SELECT id FROM products ORDER BY id LIMIT :n)"),
                         {"n": n})
    return name, url


def _drop(cat: ChaosCatalog, name: str) -> None:
    engine_for(cat.url(name)).dispose()
    drop_pg_database(cat.base, name)


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


def tags_by_sku(url: str) -> dict[str, list[tuple]]:
    """Every product's tags keyed by SKU: (level, style, is_primary, model_version, score), sorted."""
    out: dict[str, list[tuple]] = {}
    with engine_for(url).connect() as conn:
        rows = conn.execute(text(
            "SELECT p.sku, l.level, l.name, s.is_primary, s.model_version, s.score FROM product_styles s "
            "JOIN products p ON p.id = s.product_id JOIN style_labels l ON l.id = s.label_id"
        )).all()
    for sku, level, name, primary, version, score in rows:
        out.setdefault(sku, []).append((level, name, bool(primary), version, float(score)))
    return {k: sorted(v) for k, v in out.items()}


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


def assert_same_tags(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Same products, same labels, same primaries, same model; scores equal within SCORE_TOL."""
    assert got.keys() == want.keys(), (len(got), len(want), sorted(set(got) ^ set(want))[:5])
    bad = []
    for sku, rows in got.items():
        ref = want[sku]
        if [r[:4] for r in rows] != [r[:4] for r in ref] or any(
                abs(a[4] - b[4]) > SCORE_TOL for a, b in zip(rows, ref, strict=True)):
            bad.append((sku, rows, ref))
    assert not bad, f"{len(bad)} products differ from the clean run, e.g. {bad[:2]}"


# --- checks on a finished run ---------------------------------------------------------------------------


def run_info(url: str, run_id: int) -> dict:
    from catalog.runs import get_run, run_as_dict

    with session_scope(url) as s:
        return run_as_dict(get_run(s, run_id))


def consistency(conn_or_url, run_id: int) -> dict[str, int]:
    """Invariants that must hold in *every* snapshot, read in one statement (one snapshot):
    a product tagged in the run shows exactly one primary tag per level (published: a person's tag in place
    of the model's); no product has tags without a
    tagged state; the run's counters equal its tag_state rows (written in the same transaction)."""
    sql = (
        "SELECT "
        "(SELECT count(*) FROM tag_state t WHERE t.status = 'tagged' AND t.run_id = %(run)s AND "
        "  (SELECT count(*) FILTER (WHERE l.level = 'coarse') * 10 + count(*) FILTER (WHERE l.level = 'fine') "
        "   FROM product_styles s JOIN style_labels l ON l.id = s.label_id "
        "   WHERE s.product_id = t.product_id AND s.is_primary AND s.published) <> 11) AS bad_primaries, "
        "(SELECT count(DISTINCT s.product_id) FROM product_styles s LEFT JOIN tag_state t ON "
        "  t.product_id = s.product_id WHERE t.product_id IS NULL OR t.status <> 'tagged') AS tags_without_state, "
        "(SELECT count(*) FROM tag_state WHERE run_id = %(run)s AND status = 'tagged') AS tagged_rows, "
        "(SELECT count(*) FROM tag_state WHERE run_id = %(run)s AND status = 'failed') AS failed_rows, "
        "(SELECT done FROM tagging_runs WHERE id = %(run)s) AS done, "
        "(SELECT failed FROM tagging_runs WHERE id = %(run)s) AS failed"
    )
    if isinstance(conn_or_url, str):
        with psycopg.connect(_libpq(*conn_or_url.rsplit("/", 1))) as conn:
            row = conn.execute(sql, {"run": run_id}).fetchone()
    else:
        row = conn_or_url.execute(sql, {"run": run_id}).fetchone()
    keys = ("bad_primaries", "tags_without_state", "tagged_rows", "failed_rows", "done", "failed")
    return dict(zip(keys, row, strict=True))


def assert_consistent(c: dict[str, int]) -> None:
    assert c["bad_primaries"] == 0 and c["tags_without_state"] == 0, c
    assert (c["tagged_rows"], c["failed_rows"]) == (c["done"], c["failed"]), c


def state_summary(url: str) -> list[tuple]:
    """(status, run_id, model_version, count) over tag_state."""
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT status, run_id, model_version, count(*) FROM tag_state GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"))]


def assert_run_exact(url: str, run_id: int, n: int, reference: dict[str, list[tuple]]) -> dict:
    """The end state of a run over all n products: done, counters exact, one tagged state each with this
    run's id, and the same tags as the clean run."""
    info = run_info(url, run_id)
    assert info["status"] == "done", info
    assert (info["total"], info["done"], info["failed"]) == (n, n, 0), info
    states = state_summary(url)
    assert len(states) == 1 and states[0][:2] == ("tagged", run_id) and states[0][3] == n, states
    assert_consistent(consistency(url, run_id))
    got = tags_by_sku(url)
    assert_same_tags(got, {k: v for k, v in reference.items() if k in got})
    assert len(got) == n
    return info


def task_lines(*workers: WorkerProcess) -> list[dict[str, str]]:
    """The ``tag_products run=...`` lines the workers logged, as dicts of their key=value fields."""
    import re

    out = []
    for w in workers:
        for line in w.text().splitlines():
            if "tag_products run=" in line:
                out.append(dict(re.findall(r"(\w+)=(\S+)", line.split("tag_products", 1)[1])))
    return out


def settled_task_lines(*workers: WorkerProcess, until, timeout: float = 30.0) -> list[dict[str, str]]:
    """task_lines once ``until(lines)`` holds (a task logs its line just after its last commit), or
    after ``timeout`` as they are, for the caller's assertion to show what is missing."""
    deadline = time.monotonic() + timeout
    while True:
        lines = task_lines(*workers)
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


# --- broker ---------------------------------------------------------------------------------------------


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


class RedisServer:
    """A private redis-server on a free port that keeps nothing on disk: killing it loses every message."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server binary not installed")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_until(lambda: self._ping(client), timeout=20, interval=0.05)

    @staticmethod
    def _ping(client) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def queue_state(client: redis.Redis, queue: str = "bulk") -> tuple[int, int]:
    """(messages waiting in the queue, messages delivered and not yet acknowledged)."""
    return client.llen(queue), client.hlen("unacked")


# --- workers --------------------------------------------------------------------------------------------


def chaos_env(db_url: str, broker_url: str, home: Path, store_uri: str, **extra: str) -> dict[str, str]:
    env = {
        "STYLETAG_DATABASE_URL": db_url,
        "STYLETAG_BROKER_URL": broker_url,
        "STYLETAG_STORE_URL": store_uri,
        "STYLETAG_ALLOWED_IMAGE_PREFIXES": store_uri.rstrip("/") + "/",
        "STYLETAG_HOME": str(home),
        "STYLETAG_BATCH_SIZE": str(BATCH),
        "STYLETAG_FETCH_THREADS": "4",
        "STYLETAG_TORCH_THREADS": "1",
        "STYLETAG_VISIBILITY_TIMEOUT": "3600",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


try:  # resolved here, in the parent: the child between fork and exec must not import anything
    _prctl = __import__("ctypes").CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _term_when_parent_dies() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Should pytest itself be killed (no teardown), the launcher gets SIGTERM and stops its workers."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChaosWorker(WorkerProcess):
    """``styletag worker --gpus none --queues bulk`` in its own process group (as WorkerProcess), that
    also stops when the test process dies."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--gpus", "none", "--queues", "bulk", "--threads", "1"],
            env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_term_when_parent_dies,
        )


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


def retag(env: dict[str, str], *args: str, timeout: float = 120.0) -> dict:
    """``styletag retag ... --json``; the run as JSON (last line of stdout)."""
    import json

    proc = run_cli(env, "retag", *args, "--json", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Progress:
    """Fast polling of a run's counters on one autocommit connection (each read is a fresh snapshot)."""

    def __init__(self, url: str, run_id: int):
        self.conn = psycopg.connect(_libpq(*url.rsplit("/", 1)), autocommit=True)
        self.run_id = run_id

    def counts(self) -> tuple[int, int, int, str]:
        return self.conn.execute("SELECT done, failed, total, status FROM tagging_runs WHERE id = %s",
                                 (self.run_id,)).fetchone()

    def wait_mid_chunk(self, chunk: int, *, at_least: int, timeout: float = 120.0) -> int:
        """Wait until at least ``at_least`` products are done and the counter stands inside a chunk
        (``done % chunk`` is a whole number of batches but not a whole chunk): the worker has written
        part of the chunk it holds and is computing the rest. Returns ``done``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, failed, total, _ = self.counts()
            if done >= at_least and done % chunk and done + failed < total:
                return done
            time.sleep(0.02)
        raise TimeoutError(f"run {self.run_id} never stood inside a chunk: {self.counts()}")

    def wait_stable(self, quiet: float, timeout: float = 180.0) -> tuple:
        """Wait until the counters have not moved for ``quiet`` seconds; returns them."""
        last, since, deadline = self.counts(), time.monotonic(), time.monotonic() + timeout
        while time.monotonic() - since < quiet:
            assert time.monotonic() < deadline, f"run {self.run_id} never settled: {last}"
            time.sleep(0.2)
            now = self.counts()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def wait_status(self, status: str = "done", timeout: float = 180.0) -> tuple:
        wait_until(lambda: self.counts()[3] == status, timeout=timeout, interval=0.2)
        return self.counts()

    def close(self) -> None:
        self.conn.close()


# --- a faulty S3 endpoint -------------------------------------------------------------------------------


class FaultyEndpoint:
    """A TCP proxy in front of the S3 server. Modes: ``forward``; ``error`` (every request is answered
    ``503 SlowDown``, as S3 does when throttling); ``down`` (the port is closed: connection refused).
    Switching mode drops every open connection, so pooled keep-alive connections see the change too."""

    SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = free_port()
        self.mode = "forward"
        self.served = Counter()  # connections per mode while it was on
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        lsock.settimeout(0.05)
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, args=(lsock,), daemon=True)
        self._thread.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                self._track(conn)
                self.served[self.mode] += 1
                target = self._serve_errors if self.mode == "error" else self._forward
                threading.Thread(target=target, args=(conn,), daemon=True).start()
        finally:
            lsock.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.add(s)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
            with self._lock:
                self._conns.discard(s)

    def _drop_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        self._close(*conns)

    def set_mode(self, mode: str) -> None:
        assert mode in ("forward", "error", "down")
        if mode == "down":
            self._stop.set()
            if self._thread is not None:
                self._thread.join(5)
        elif self.mode == "down":
            self._listen()
        self.mode = mode
        self._drop_all()

    def close(self) -> None:
        self.set_mode("down")

    def _forward(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._close(client)
            return
        up.settimeout(None)
        self._track(up)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(up, client), daemon=True)
        back.start()
        pump(client, up)
        back.join(5)
        self._close(client, up)

    def _serve_errors(self, conn: socket.socket) -> None:
        """Read one request (headers and body), answer 503 SlowDown, close."""
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            while len(rest) < length:
                data = conn.recv(65536)
                if not data:
                    return
                rest += data
            body = b"" if head.startswith(b"HEAD ") else self.SLOWDOWN
            conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            self._close(conn)


@pytest.fixture
def faulty_s3(s3_server):
    """A :class:`FaultyEndpoint` in front of the session's moto server, closed after the test."""
    proxy = FaultyEndpoint(s3_server.endpoint)
    yield proxy
    proxy.close()
