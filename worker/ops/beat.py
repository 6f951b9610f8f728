"""The nightly schedule: Celery beat sends ``styletag.nightly_retag`` at ``STYLETAG_NIGHTLY_CRON`` (UTC);
the task (``worker.tasks``) starts the run through ``worker.producers.nightly``, which never doubles one.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import signals
from celery.schedules import crontab

from catalog.errors import ConfigError
from catalog.settings import Settings
from worker.app import BULK_QUEUE, app

log = logging.getLogger("styletag.schedule")

ENTRY = "nightly-retag"
TASK = "styletag.nightly_retag"


def parse_cron(expr: str) -> crontab:
    """A five-field cron expression (minute hour day-of-month month day-of-week), UTC."""
    parts = (expr or "").split()
    if len(parts) != 5:
        raise ConfigError(f"STYLETAG_NIGHTLY_CRON must have 5 fields (min hour dom month dow), got {expr[:80]!r}")
    minute, hour, dom, month, dow = parts
    try:
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"bad STYLETAG_NIGHTLY_CRON {expr[:80]!r}: {str(exc).splitlines()[0][:120]}") from None


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
