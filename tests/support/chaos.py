"""What the fault tests (tests/chaos) share besides fixtures: the catalog template and its copies, the clean
reference and the checks against it, run counters and worker log lines, worker processes that die with the
test, and the CLI's retag. The fixtures themselves are in tests/chaos/conftest.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from sqlalchemy import text

from catalog.db import engine_for, session_scope
from tests.conftest import _libpq, drop_pg_database
from tests.support.worker import WorkerProcess, run_cli, wait_until

REDIS_DB = 12


CATALOG_N = 2000


BATCH = 64  # images per model call in every run here (small, so a chunk holds several batches)


SCORE_TOL = 1e-4  # scores may differ in the last float bits when a batch is composed differently


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


def queue_state(client: redis.Redis, queue: str = "bulk") -> tuple[int, int]:
    """(messages waiting in the queue, messages delivered and not yet acknowledged)."""
    return client.llen(queue), client.hlen("unacked")


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
            [sys.executable, "-m", "worker.cli", "worker", "--gpus", "none", "--queues", "bulk", "--threads", "1",
             "--bulk-procs", "1"],  # one pool process: the faults below are counted for one
            env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_term_when_parent_dies,
        )


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
