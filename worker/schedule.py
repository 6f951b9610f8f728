"""The nightly schedule: Celery beat sends ``styletag.nightly_retag`` at ``STYLETAG_NIGHTLY_CRON``.

Two nightly runs never overlap: the task takes a Redis lock while it creates and enqueues a run, and
refuses to start when a nightly run is still enqueuing or running; that case is reported (logged and
returned), not doubled.
"""

from __future__ import annotations

import logging

from celery.schedules import crontab
from sqlalchemy import select

from catalog.db import session_scope
from catalog.errors import ConfigError
from catalog.schema import TaggingRun
from catalog.settings import Settings
from worker.app import app

log = logging.getLogger("styletag.schedule")

LOCK_KEY = "styletag:nightly:lock"
LOCK_SECONDS = 3600


def parse_cron(expr: str) -> crontab:
    parts = expr.split()
    if len(parts) != 5:
        raise ConfigError(f"STYLETAG_NIGHTLY_CRON must have 5 fields (min hour dom month dow), got {expr!r}")
    minute, hour, dom, month, dow = parts
    try:
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad STYLETAG_NIGHTLY_CRON {expr!r}: {exc}") from None


def configure_beat(settings: Settings) -> None:
    app.conf.beat_schedule = {
        "nightly-retag": {"task": "styletag.nightly_retag", "schedule": parse_cron(settings.nightly_cron),
                          "options": {"queue": "bulk"}},
    }


def running_nightly(database_url: str) -> TaggingRun | None:
    with session_scope(database_url) as s:
        return s.scalars(
            select(TaggingRun).where(TaggingRun.kind == "nightly", TaggingRun.status.in_(("enqueuing", "running")))
            .order_by(TaggingRun.id)
        ).first()


def start_nightly(settings: Settings, *, redis_client=None) -> dict:
    """Create and enqueue a nightly ``--changed-only`` run unless one is still going."""
    import redis

    from worker.retag import enqueue_run, start_run

    client = redis_client or redis.Redis.from_url(settings.broker_url)
    lock = client.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire(blocking=False):
        log.warning("nightly retag skipped: another nightly run is being started right now")
        return {"started": False, "reason": "locked"}
    try:
        busy = running_nightly(settings.database_url)
        if busy is not None:
            log.warning("nightly retag skipped: run %d is still %s (%d done, %d failed of %d)",
                        busy.id, busy.status, busy.done, busy.failed, busy.total)
            return {"started": False, "reason": "still_running", "run_id": busy.id}
        run_id = start_run(settings, scope="changed", kind="nightly")
        sent = enqueue_run(settings, run_id)
        log.info("nightly retag run %d enqueued %d products", run_id, sent)
        return {"started": True, "run_id": run_id, "enqueued": sent}
    finally:
        try:
            lock.release()
        except Exception:  # noqa: S110 - an expired lock is fine
            pass


@app.task(name="styletag.nightly_retag", acks_late=True, ignore_result=True)
def nightly_retag() -> dict:
    return start_nightly(Settings.from_env())
