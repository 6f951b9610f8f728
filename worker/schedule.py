"""The nightly schedule: Celery beat sends ``styletag.nightly_retag`` at ``STYLETAG_NIGHTLY_CRON`` (UTC),
and the task starts a ``retag --changed-only`` run of kind ``nightly``.

Two nightly runs never overlap, by two independent guards:

1. a Redis lock (``styletag:nightly:lock``) held while a run is created and enqueued, refreshed at
   every chunk, so a second start (a second beat, a redelivered message) gives up at once;
2. in the database, the check "is a nightly run still enqueuing or running?" and the creation of the
   new run happen in one transaction under a PostgreSQL transaction-level advisory lock (SQLite's
   ``BEGIN IMMEDIATE`` serialises it there), so even without the Redis lock (a broker fail-over that
   lost it) two starts cannot both create a run.

A nightly run that is still going when the next is due is reported (a warning, and the task's
result), not doubled. A run left in ``enqueuing`` by a producer that died (no lock holder refreshed
it for ``LOCK_SECONDS``) would block every later night; it is cancelled, reported, and a new
``--changed-only`` run picks up whatever it had not tagged.

Redis is reached through a kombu broker connection (``worker.app.broker_connection``), so a
``sentinel://`` broker URL (with ``STYLETAG_BROKER_MASTER_NAME``) works here as it does for the workers:
the lock lives on the current master.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from celery import signals
from celery.schedules import crontab
from sqlalchemy import select, text

from catalog.db import session_scope
from catalog.errors import ConfigError, StyletagError
from catalog.schema import TaggingRun
from catalog.settings import Settings
from worker.app import BULK_QUEUE, app, broker_connection

log = logging.getLogger("styletag.schedule")

ENTRY = "nightly-retag"
TASK = "styletag.nightly_retag"
LOCK_KEY = "styletag:nightly:lock"
# The lock expires this long after its holder stopped refreshing it (it refreshes at every chunk).
LOCK_SECONDS = 600
# Any fixed 64-bit number, the same in every process: the key of the advisory lock.
ADVISORY_KEY = 0x5759_1E7A_6E16_4701 & 0x7FFF_FFFF_FFFF_FFFF
# Enqueueing 10 million ids takes minutes; the task must not be killed by the 15-minute default.
NIGHTLY_SOFT_TIME_LIMIT = 4 * 3600


def parse_cron(expr: str) -> crontab:
    """A five-field cron expression (minute hour day-of-month month day-of-week), UTC."""
    parts = (expr or "").split()
    if len(parts) != 5:
        raise ConfigError(f"STYLETAG_NIGHTLY_CRON must have 5 fields (min hour dom month dow), got {expr!r}")
    minute, hour, dom, month, dow = parts
    try:
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"bad STYLETAG_NIGHTLY_CRON {expr!r}: {str(exc).splitlines()[0][:120]}") from None


def beat_schedule(settings: Settings) -> dict:
    """Beat's schedule: one entry, the nightly ``retag --changed-only``."""
    return {ENTRY: {"task": TASK, "schedule": parse_cron(settings.nightly_cron), "options": {"queue": BULK_QUEUE}}}


def configure_beat(settings: Settings, celery_app=None) -> None:
    (celery_app or app).conf.beat_schedule = beat_schedule(settings)


@signals.beat_init.connect
def _announce_schedule(sender=None, **_kwargs) -> None:
    """One line at beat's start saying when the nightly run is due (what an operator checks first)."""
    try:
        entry = sender.scheduler.schedule[ENTRY]
    except (AttributeError, KeyError):
        log.warning("beat started without the %s entry; is STYLETAG_NIGHTLY_CRON set?", ENTRY)
        return
    due_in = entry.schedule.remaining_estimate(entry.last_run_at)
    log.info("nightly retag scheduled: cron %r (UTC), next in %s", Settings.from_env().nightly_cron,
             str(timedelta(seconds=int(due_in.total_seconds()))))


def running_nightly(database_url: str) -> TaggingRun | None:
    with session_scope(database_url) as s:
        return _busy_nightly(s)


def _busy_nightly(session) -> TaggingRun | None:
    return session.scalars(
        select(TaggingRun)
        .where(TaggingRun.kind == "nightly", TaggingRun.status.in_(("enqueuing", "running")))
        .order_by(TaggingRun.id)
    ).first()


def _age_seconds(run: TaggingRun) -> float:
    created = run.created_at if run.created_at.tzinfo else run.created_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds()


def claim_nightly(settings: Settings, model_version: str) -> dict:
    """In one transaction: report the nightly run still going, or cancel an orphaned one and create
    the new run. Returns ``{"created": run_id}`` or ``{"busy": run}`` (plus ``"cancelled"``)."""
    from catalog.runs import cancel_run, create_run, run_as_dict

    with session_scope(settings.database_url) as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_KEY})
        busy = _busy_nightly(s)
        cancelled = None
        if busy is not None and busy.status == "enqueuing" and _age_seconds(busy) > LOCK_SECONDS:
            # Its producer held our lock and refreshed it at every chunk; nobody has for LOCK_SECONDS.
            cancel_run(s, busy.id)
            cancelled = run_as_dict(busy)
            busy = _busy_nightly(s)
        if busy is not None:
            return {"busy": run_as_dict(busy), "cancelled": cancelled}
        run = create_run(s, kind="nightly", scope="changed", model_version=model_version)
        return {"created": run.id, "cancelled": cancelled}


def broker_redis(conn):
    """The redis-py client behind a kombu connection (plain Redis or Sentinel's current master)."""
    client = getattr(conn.default_channel, "client", None)
    if client is None or not hasattr(client, "lock"):
        raise ConfigError(f"the nightly lock needs a Redis broker, not {conn.transport_cls!r}")
    return client


def _sender(conn, lock):
    from redis.exceptions import LockError

    from worker.tasks import tag_products

    def send(run_id: int, ids: list[int]) -> None:
        try:
            lock.reacquire()  # another LOCK_SECONDS; raises when the lock expired and was taken
        except LockError:
            raise StyletagError(f"nightly lock lost while enqueuing run {run_id}; it stays 'enqueuing' and the "
                                "next nightly start cancels it") from None
        tag_products.apply_async(args=(run_id, ids), queue=BULK_QUEUE, connection=conn, retry=True,
                                 retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1})

    return send


def start_nightly(settings: Settings, *, redis_client=None, chunk: int = 1024, report_skip: bool = True) -> dict:
    """Create and enqueue a nightly ``--changed-only`` run unless one is still going. Everything goes
    to ``settings``' broker and database (not to whatever the process's Celery app was built with).
    ``report_skip=False``: a skipped start is only returned, not logged (the CLI says it itself)."""
    from redis.exceptions import LockError

    from worker.retag import current_model_version, enqueue_run

    version = current_model_version(settings)
    with broker_connection(settings) as conn:
        client = redis_client or broker_redis(conn)
        lock = client.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=False)
        if not lock.acquire(blocking=False):
            if report_skip:
                log.warning("nightly retag skipped: another nightly run is being started right now")
            return {"started": False, "reason": "locked"}
        try:
            claim = claim_nightly(settings, version)
            if claim["cancelled"]:
                c = claim["cancelled"]
                log.warning("nightly run %d was left enqueuing by a producer that died (%d of %d done); "
                            "cancelled it", c["id"], c["done"], c["total"])
            if "busy" in claim:
                busy = claim["busy"]
                (log.warning if report_skip else log.debug)(
                    "nightly retag skipped: run %d is still %s (%d done, %d failed of %d); not starting "
                    "another. If it is stuck, 'styletag retag --resume %d' re-enqueues what it has not done",
                    busy["id"], busy["status"], busy["done"], busy["failed"], busy["total"], busy["id"],
                )
                return {"started": False, "reason": "still_running", "run_id": busy["id"], "run": busy}
            run_id = claim["created"]
            sent = enqueue_run(settings, run_id, chunk=chunk, send=_sender(conn, lock))
            log.info("nightly retag run %d enqueued %d products", run_id, sent,
                     extra={"run_id": run_id})
            out = {"started": True, "run_id": run_id, "enqueued": sent}
            if claim["cancelled"]:
                out["cancelled"] = claim["cancelled"]["id"]
            return out
        finally:
            try:
                lock.release()
            except LockError:  # expired meanwhile: nothing to release
                pass


@app.task(name=TASK, acks_late=True, ignore_result=True, soft_time_limit=NIGHTLY_SOFT_TIME_LIMIT,
          time_limit=NIGHTLY_SOFT_TIME_LIMIT + 60)
def nightly_retag() -> dict:
    return start_nightly(Settings.from_env())
