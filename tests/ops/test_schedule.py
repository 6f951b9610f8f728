"""The nightly schedule: STYLETAG_NIGHTLY_CRON drives beat's entry, and overlapping nightly starts
never make two runs (Redis lock, and a database guard that holds on its own); a nightly run still
going when the next is due is reported, not doubled. Real PostgreSQL and Redis; no worker needed:
what a start enqueues is read back from the broker's queue."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import threading
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import redis
from celery import Celery
from celery.schedules import crontab
from sqlalchemy import func, select, update

from catalog.db import session_scope
from catalog.errors import ConfigError
from catalog.schema import Product, TaggingRun
from catalog.settings import Settings
from tests.conftest import truncate_all
from tests.ops.test_smoke import BIN, BROKER_URL, service_env
from worker.ops.beat import ENTRY, TASK, beat_schedule, configure_beat, parse_cron
from worker.producers.nightly import LOCK_KEY, LOCK_SECONDS, claim_nightly, start_nightly

N_PRODUCTS = 30
_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                     "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082")


@pytest.fixture
def nightly(pg_url, tmp_path):
    truncate_all(pg_url)
    images = tmp_path / "images"  # real files: retag's preflight reads a few (STYLETAG_HOME=tmp_path)
    images.mkdir()
    with session_scope(pg_url) as s:
        for i in range(N_PRODUCTS):
            (images / f"{i}.png").write_bytes(_PNG)
            s.add(Product(sku=f"n-{i}", title="x", image_uri=(images / f"{i}.png").as_uri(), image_version="v1"))
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    settings = replace(Settings.from_env(), database_url=pg_url, broker_url=BROKER_URL)
    yield settings, broker
    broker.flushdb()


def queued(broker) -> Counter:
    """run id -> product ids waiting in the bulk queue (decoded from the Celery messages)."""
    out: Counter = Counter()
    for raw in broker.lrange("bulk", 0, -1):
        msg = json.loads(raw)
        assert msg["headers"]["task"] == "styletag.tag_products"
        args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        out[args[0]] += len(args[1])
    return out


def nightly_runs(url: str) -> list[tuple[int, str]]:
    with session_scope(url) as s:
        return [tuple(r) for r in s.execute(select(TaggingRun.id, TaggingRun.status)
                                            .where(TaggingRun.kind == "nightly").order_by(TaggingRun.id))]


def finish_all(url: str) -> None:
    with session_scope(url) as s:
        s.execute(update(TaggingRun).where(TaggingRun.status.in_(("enqueuing", "running"))).values(status="done"))


# --- the schedule entry -----------------------------------------------------------------------------


def test_nightly_cron_configures_beats_schedule(monkeypatch):
    monkeypatch.setenv("STYLETAG_NIGHTLY_CRON", "15 3 * * 1-5")
    settings = Settings.from_env()
    entry = beat_schedule(settings)[ENTRY]
    assert entry["task"] == TASK and entry["options"] == {"queue": "bulk"}
    assert entry["schedule"] == crontab(minute="15", hour="3", day_of_week="1-5")

    # What `styletag beat` does with it: beat's own scheduler reads the entry from the app's conf.
    from celery.beat import Scheduler

    app = Celery("schedule-test", set_as_current=False)
    configure_beat(settings, app)
    scheduled = Scheduler(app=app, lazy=False).schedule[ENTRY]
    assert scheduled.task == TASK and scheduled.schedule == crontab(minute="15", hour="3", day_of_week="1-5")
    assert scheduled.options["queue"] == "bulk"

    monkeypatch.delenv("STYLETAG_NIGHTLY_CRON")
    assert beat_schedule(Settings.from_env())[ENTRY]["schedule"] == crontab(minute="0", hour="2")


@pytest.mark.parametrize("expr", ["0 2 * *", "61 2 * * *", "0 2 * * mon-xyz", ""])
def test_bad_cron_is_a_config_error(expr):
    with pytest.raises(ConfigError, match="STYLETAG_NIGHTLY_CRON"):
        parse_cron(expr)


def test_styletag_beat_refuses_a_bad_cron_in_one_line(tmp_path):
    proc = subprocess.run([str(BIN / "styletag"), "beat"], env=service_env(
        STYLETAG_NIGHTLY_CRON="0 25 * * *", STYLETAG_HOME=str(tmp_path), STYLETAG_BROKER_URL=BROKER_URL),
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: bad STYLETAG_NIGHTLY_CRON '0 25 * * *'"), proc.stderr
    assert "Traceback" not in proc.stderr


# --- never two nightly runs -------------------------------------------------------------------------


def _race(n: int, fn) -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(isinstance(r, BaseException) for r in results), results
    return results


def test_two_concurrent_nightly_starts_create_one_run(nightly):
    settings, broker = nightly
    for round_ in range(3):
        before = queued(broker)
        results = _race(2, lambda: start_nightly(settings))
        started = [r for r in results if r["started"]]
        assert len(started) == 1, results
        other = next(r for r in results if not r["started"])
        assert other["reason"] in ("locked", "still_running"), other
        runs = nightly_runs(settings.database_url)
        assert len(runs) == round_ + 1 and runs[-1] == (started[0]["run_id"], "running")
        assert queued(broker) - before == Counter({started[0]["run_id"]: N_PRODUCTS})
        finish_all(settings.database_url)  # the run completes; the next night may start one


def test_database_guard_alone_never_creates_two_runs(db_url):
    """Without the Redis lock (lost in a broker fail-over, say) the check and the creation still happen
    in one serialised transaction (PostgreSQL: advisory lock; SQLite: BEGIN IMMEDIATE): of four
    simultaneous claims exactly one creates a run."""
    settings = replace(Settings.from_env(), database_url=db_url)
    for round_ in range(4):
        results = _race(4, lambda: claim_nightly(settings, "v-test"))
        created = [r["created"] for r in results if "created" in r]
        assert len(created) == 1, results
        assert {r["busy"]["id"] for r in results if "busy" in r} == set(created)
        assert len(nightly_runs(settings.database_url)) == round_ + 1
        finish_all(settings.database_url)


def test_a_nightly_run_still_going_is_reported_not_doubled(nightly, caplog):
    settings, broker = nightly
    first = start_nightly(settings)
    assert first["started"] and queued(broker) == Counter({first["run_id"]: N_PRODUCTS})
    with caplog.at_level(logging.WARNING, logger="styletag.nightly"):
        again = start_nightly(settings)
    assert again["started"] is False and again["reason"] == "still_running"
    assert again["run_id"] == first["run_id"] and again["run"]["status"] == "running"
    assert queued(broker) == Counter({first["run_id"]: N_PRODUCTS})  # nothing enqueued twice
    assert nightly_runs(settings.database_url) == [(first["run_id"], "running")]
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "styletag.nightly")
    assert f"run {first['run_id']} is still running" in warning
    assert f"styletag retag --resume {first['run_id']}" in warning


def test_a_run_left_enqueuing_by_a_dead_producer_is_cancelled_and_replaced(nightly):
    from catalog.runs import create_run

    settings, broker = nightly
    with session_scope(settings.database_url) as s:
        stale = create_run(s, kind="nightly", scope="changed", model_version="old")
        stale.created_at = datetime.now(UTC) - timedelta(seconds=2 * LOCK_SECONDS)
        stale_id = stale.id
    result = start_nightly(settings)
    assert result["started"] and result["cancelled"] == stale_id
    assert nightly_runs(settings.database_url) == [(stale_id, "cancelled"), (result["run_id"], "running")]
    assert queued(broker) == Counter({result["run_id"]: N_PRODUCTS})

    # A run that has just begun enqueuing is another producer at work, not an orphan: reported.
    finish_all(settings.database_url)
    with session_scope(settings.database_url) as s:
        fresh_id = create_run(s, kind="nightly", scope="changed", model_version="v").id
    result = start_nightly(settings)
    assert (result["started"], result["reason"], result["run_id"]) == (False, "still_running", fresh_id)


def test_lock_held_by_another_producer_skips_the_start(nightly):
    settings, broker = nightly
    other = broker.lock(LOCK_KEY, timeout=60)
    assert other.acquire(blocking=False)
    try:
        assert start_nightly(settings) == {"started": False, "reason": "locked"}
    finally:
        other.release()
    assert nightly_runs(settings.database_url) == [] and queued(broker) == Counter()


def test_the_beat_task_starts_a_changed_only_nightly_run(nightly, monkeypatch):
    """The task beat sends (run here in-process, as a worker would run it) with the environment's
    settings: a nightly --changed-only run of every never-tagged product."""
    from worker.tasks import nightly_retag

    settings, broker = nightly
    monkeypatch.setenv("STYLETAG_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("STYLETAG_BROKER_URL", settings.broker_url)
    result = nightly_retag.apply().get()
    assert result["started"] and result["enqueued"] == N_PRODUCTS
    with session_scope(settings.database_url) as s:
        run = s.get(TaggingRun, result["run_id"])
        assert (run.kind, run.scope, run.status, run.total) == ("nightly", "changed", "running", N_PRODUCTS)
        assert s.scalar(select(func.count()).select_from(TaggingRun)) == 1


def test_cli_nightly_goes_through_the_same_guard(nightly, tmp_path):
    """``styletag retag --kind nightly`` (an operator starting tonight's run by hand) never doubles a
    nightly run that beat started: it answers one error line and enqueues nothing."""
    settings, broker = nightly
    env = service_env(STYLETAG_DATABASE_URL=settings.database_url, STYLETAG_BROKER_URL=BROKER_URL,
                      STYLETAG_HOME=str(tmp_path))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "styletag"), "retag", "--kind", "nightly", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    first = cli("--json")
    assert first.returncode == 0, first.stderr
    run = json.loads(first.stdout)
    assert run["kind"] == "nightly" and run["scope"] == "changed"
    assert queued(broker) == Counter({run["id"]: N_PRODUCTS})
    again = cli()
    assert again.returncode != 0
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), again.stderr
    assert f"nightly run {run['id']} is still" in lines[0] and "Traceback" not in again.stderr
    assert queued(broker) == Counter({run["id"]: N_PRODUCTS})  # nothing enqueued twice
    assert nightly_runs(settings.database_url) == [(run["id"], "running")]
    refused = cli("--all")
    assert refused.returncode != 0 and "--changed-only" in refused.stderr
