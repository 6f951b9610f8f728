"""The nightly start: a ``retag --changed-only`` run of kind ``nightly``, never two at once.

Two independent guards:

1. a Redis lock (``styletag:nightly:lock``) held while a run is created and enqueued, refreshed before
   every chunk is sent, so a second start (a second beat, a redelivered message) gives up at once;
2. in the database, ``catalog.runs.claim_nightly`` checks "is a nightly run still enqueuing or running?"
   and creates the new run in one transaction under a lock, so even without the Redis lock (a broker
   fail-over that lost it) two starts cannot both create a run.

A nightly run that is still going when the next is due is reported (a warning, and the task's result),
not doubled. A run left in ``enqueuing`` by a producer that died (no lock holder refreshed it for
``LOCK_SECONDS``) would block every later night; it is cancelled, reported, and a new ``--changed-only``
run picks up whatever it had not tagged.

Redis is reached through a kombu broker connection (``worker.app.broker_connection``), so a
``sentinel://`` broker URL works here as it does for the workers: the lock lives on the current master.
"""

from __future__ import annotations

import logging

from catalog import runs
from catalog.db import session_scope
from catalog.errors import ConfigError, StyletagError
from catalog.settings import Settings
from worker.app import broker_connection
from worker.producers.send import Sender

log = logging.getLogger("styletag.nightly")

LOCK_KEY = "styletag:nightly:lock"
# The lock expires this long after its holder stopped refreshing it (it refreshes at every chunk).
LOCK_SECONDS = 600


def claim_nightly(settings: Settings, model_version: str) -> dict:
    """``catalog.runs.claim_nightly`` in its own transaction; a run enqueuing for longer than the lock's
    life has lost its producer."""
    with session_scope(settings.database_url) as session:
        return runs.claim_nightly(session, model_version, stale_after_s=LOCK_SECONDS)


def running_nightly(database_url: str):
    """The nightly run still enqueuing or running, if any."""
    with session_scope(database_url) as session:
        return next(iter(runs.unfinished_runs(session, "nightly")), None)


def broker_redis(conn):
    """The redis-py client behind a kombu connection (plain Redis or Sentinel's current master)."""
    client = getattr(conn.default_channel, "client", None)
    if client is None or not hasattr(client, "lock"):
        raise ConfigError(f"the nightly lock needs a Redis broker, not {conn.transport_cls!r}")
    return client


def _refresh(lock, run_id_box: list[int]):
    from redis.exceptions import LockError

    def refresh() -> None:
        try:
            lock.reacquire()  # another LOCK_SECONDS; raises when the lock expired and was taken
        except LockError:
            raise StyletagError(f"nightly lock lost while enqueuing run {run_id_box[0]}; it stays 'enqueuing' and "
                                "the next nightly start cancels it") from None

    return refresh


def start_nightly(settings: Settings, *, redis_client=None, chunk: int = 1024, report_skip: bool = True,
                  check_images: bool = True) -> dict:
    """Create and enqueue a nightly ``--changed-only`` run unless one is still going. Everything goes
    to ``settings``' broker and database (not to whatever the process's Celery app was built with).
    ``report_skip=False``: a skipped start is only returned, not logged (the CLI says it itself).
    ``check_images``: first read every image's version, so a photo replaced behind an unchanged URI is
    retagged (the CLI does that itself before it gets here)."""
    from redis.exceptions import LockError

    from worker.producers.retag import current_model_version, enqueue_run

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
            if check_images:
                from worker.producers.retag import check_image_versions

                check = check_image_versions(settings)
                log.info("nightly run %d: image check: %d images, %d changed, %d unreadable", run_id,
                         check.checked, check.changed, check.unreadable, extra={"run_id": run_id})
            with Sender(settings, before_send=_refresh(lock, [run_id])) as send:
                sent = enqueue_run(settings, run_id, chunk=chunk, send=send)
            log.info("nightly retag run %d enqueued %d products", run_id, sent, extra={"run_id": run_id})
            out = {"started": True, "run_id": run_id, "enqueued": sent}
            if claim["cancelled"]:
                out["cancelled"] = claim["cancelled"]["id"]
            return out
        finally:
            try:
                lock.release()
            except LockError:  # expired meanwhile: nothing to release
                pass
