"""Celery tasks. Thin shells: validate the message, then call the pipeline.

Tasks take ids and re-read rows, so a redelivered message leaves the same rows (the tag write is an
idempotent upsert that counts each product once per run). Transient database and storage errors
retry with exponential backoff; a bad image is recorded as failed and never retried.
"""

from __future__ import annotations

import logging
import os
import time

from celery import signals
from celery.exceptions import Reject
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from sqlalchemy.exc import InterfaceError, OperationalError

from catalog.errors import ServiceUnavailable
from worker.app import (
    BULK_SOFT_TIME_LIMIT,
    BULK_TIME_LIMIT,
    MAX_IDS_PER_TASK,
    UPLOAD_FLUSH_EVERY,
    UPLOAD_FLUSH_INTERVAL,
    UPLOADS_QUEUE,
    app,
)
from worker.context import get_context

log = logging.getLogger("styletag.tasks")

TRANSIENT = (ServiceUnavailable, OperationalError, InterfaceError)
UPLOAD_MAX_ATTEMPTS = 8

# Test knobs, never set in production: a bulk task delivered for the first time waits this many seconds
# before working (or, with the gate, until the gate file exists, at most that long), so that it outlives
# a short visibility timeout and its message is delivered again while it waits.
_TEST_TASK_DELAY = float(os.environ["STYLETAG_TEST_TASK_DELAY"]) if os.environ.get("STYLETAG_TEST_TASK_DELAY") else 0.0
_TEST_TASK_GATE = os.environ.get("STYLETAG_TEST_TASK_GATE") or None


def _test_delay() -> None:
    deadline = time.monotonic() + _TEST_TASK_DELAY
    while time.monotonic() < deadline and not (_TEST_TASK_GATE and os.path.exists(_TEST_TASK_GATE)):
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


class InvalidMessage(ValueError):
    pass


def validate_ids(product_ids, *, limit: int = MAX_IDS_PER_TASK) -> list[int]:
    """Ids must be a list of positive ints, bounded in length; anything else is refused unexecuted."""
    if not isinstance(product_ids, list):
        raise InvalidMessage(f"product_ids must be a list, got {type(product_ids).__name__}")
    if len(product_ids) > limit:
        raise InvalidMessage(f"{len(product_ids)} ids in one message, over the limit of {limit}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in product_ids):
        raise InvalidMessage("product_ids must hold positive 64-bit integers only")
    return list(dict.fromkeys(product_ids))


def validate_run_id(run_id) -> int | None:
    if run_id is None or (isinstance(run_id, int) and not isinstance(run_id, bool) and run_id > 0):
        return run_id
    raise InvalidMessage(f"run_id must be a positive integer or null, got {run_id!r}")


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _scrub_worker_logs(logger=None, **_kwargs) -> None:
    """Secrets never reach a worker's log, whatever a library puts in an exception message; JSON lines
    when STYLETAG_LOG_JSON is set (worker/logs.py)."""
    from worker.logs import setup_celery_logger

    setup_celery_logger(logger)


@signals.celeryd_init.connect
def _early_worker_logs(**_kwargs) -> None:
    """With STYLETAG_LOG_JSON, warnings Celery gives before it sets up logging are JSON lines too."""
    from worker.logs import setup_early_logging

    setup_early_logging()


@signals.worker_process_init.connect
def _load_model_once(**_kwargs) -> None:
    """Load the model in each pool child after the fork (the parent never touches torch or CUDA)."""
    from worker.metrics import start_worker_metrics

    ctx = get_context()
    try:
        _ = ctx.labels
        start_worker_metrics(ctx.predictor.model_version, ctx.predictor.backbone)
    except Exception as exc:  # the task will raise the same error with its context
        log.error("worker warm-up failed: %s", exc)


@app.task(
    name="styletag.tag_products",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=12,
    soft_time_limit=BULK_SOFT_TIME_LIMIT,
    time_limit=BULK_TIME_LIMIT,
)
def tag_products(self, run_id, product_ids) -> dict:
    """Tag a chunk of a run (a few hundred to a few thousand ids)."""
    try:
        run_id = validate_run_id(run_id)
        ids = validate_ids(product_ids)
    except InvalidMessage as exc:
        log.error("refused message %s: %s", self.request.id, exc)
        raise Reject(str(exc), requeue=False) from None
    from worker.pipeline import Pipeline

    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if _TEST_TASK_DELAY and not redelivered:
        _test_delay()
    t0 = time.perf_counter()
    report = Pipeline(get_context()).run(run_id, ids)
    elapsed = time.perf_counter() - t0
    log.info(
        "tag_products run=%s task=%s batch_size=%d tagged=%d failed=%d skipped_newer=%d redelivered=%s "
        "retries=%d seconds=%.3f stages=%s",
        run_id, self.request.id, len(ids), report.tagged, report.failed, report.skipped_newer, redelivered,
        self.request.retries or 0, elapsed, {k: round(v, 3) for k, v in report.seconds.items()},
        extra={"run_id": run_id, "task_id": self.request.id, "batch_size": len(ids), "tagged": report.tagged,
               "failed": report.failed, "skipped_newer": report.skipped_newer, "redelivered": redelivered,
               "retries": self.request.retries or 0, "seconds": round(elapsed, 3),
               "stages": {k: round(v, 3) for k, v in report.seconds.items()}},
    )
    return {"tagged": report.tagged, "failed": report.failed}


class CoalescingBatches(Batches):
    """celery-batches with at most one flushed batch in the pool at a time.

    Batches flushes its buffer every ``flush_interval`` and whenever ``flush_every`` requests came in.
    With one pool process, each flush made while a batch is still running queues another small batch
    behind it, so a burst of uploads was worked off as many batches of 5-60 (a burst ran at 0.49x the bulk
    rate). Here a flush that finds a batch in flight waits, and the batch's completion flushes whatever
    arrived meanwhile as one batch (up to the prefetch limit): a lone upload still goes at the next tick,
    a backlog coalesces into full batches. A batch whose completion never comes back (its pool process
    killed: ``error_callback``; or stuck past the hard time limit) does not block the queue.
    """

    _in_flight_since: float | None = None

    def _do_flush(self) -> None:
        since = self._in_flight_since
        if since is not None and time.monotonic() - since < BULK_TIME_LIMIT:
            return
        self._in_flight_since = None
        super()._do_flush()

    def flush(self, requests):
        acks_late = [r for r in requests if r.task.acks_late]
        acks_early = [r for r in requests if not r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in acks_early:
                req.acknowledge()

        def done() -> None:
            self._in_flight_since = None
            if self._buffer.qsize():
                self._do_flush()

        def on_return(result) -> None:
            for req in acks_late:
                req.acknowledge()
            done()

        def on_error(exc) -> None:  # the pool process was lost: the messages stay unacked (redelivered)
            done()

        self._in_flight_since = time.monotonic()
        return self._pool.apply_async(apply_batches_task, (self, serializable, 0, None),
                                      accept_callback=on_accepted, callback=on_return, error_callback=on_error)


@app.task(
    name="styletag.tag_uploads",
    base=CoalescingBatches,
    flush_every=UPLOAD_FLUSH_EVERY,
    flush_interval=UPLOAD_FLUSH_INTERVAL,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=BULK_SOFT_TIME_LIMIT,
    time_limit=BULK_TIME_LIMIT,
)
def tag_uploads(requests) -> None:
    """Micro-batched uploads: each message holds one product id; one pipeline run per flush."""
    from worker.pipeline import Pipeline

    ids: list[int] = []
    attempts: dict[int, int] = {}
    for req in requests:
        try:
            args = list(req.args or ())
            kwargs = dict(req.kwargs or {})
            pid = args[0] if args else kwargs.get("product_id")
            (pid,) = validate_ids([pid], limit=1)
            attempts[pid] = int(kwargs.get("attempt", 0)) if isinstance(kwargs.get("attempt", 0), int) else 0
            ids.append(pid)
        except (InvalidMessage, IndexError, TypeError, ValueError) as exc:
            log.error("refused upload message %s: %s", req.id, exc)
    ids = list(dict.fromkeys(ids))
    if not ids:
        return
    t0 = time.perf_counter()
    try:
        report = Pipeline(get_context()).run(None, ids)
    except TRANSIENT as exc:
        # Re-send each id with a growing delay; the database stays the truth if this is lost too.
        for pid in ids:
            attempt = attempts.get(pid, 0) + 1
            if attempt <= UPLOAD_MAX_ATTEMPTS:
                tag_uploads.apply_async(args=(pid,), kwargs={"attempt": attempt}, countdown=min(60, 2**attempt),
                                        queue=UPLOADS_QUEUE)
        log.warning("uploads batch of %d will retry: %s", len(ids), str(exc).splitlines()[0][:200])
        return
    elapsed = time.perf_counter() - t0
    log.info(
        "tag_uploads batch_size=%d tagged=%d failed=%d seconds=%.3f",
        len(ids), report.tagged, report.failed, elapsed,
        extra={"batch_size": len(ids), "tagged": report.tagged, "failed": report.failed, "seconds": round(elapsed, 3),
               "stages": {k: round(v, 3) for k, v in report.seconds.items()}},
    )


# --- malformed messages -------------------------------------------------------------------------------
# Celery builds a request from a message's body before any task code runs, and lets an exception there
# (a body that is not [args, kwargs, embed]: a string, a number, a short list) stop the whole worker,
# which then meets the same message again after a restart. Every task's strategy is wrapped so that such
# a message is an invalid task instead: logged, rejected without requeue, the worker keeps serving.


def _check_body(message) -> None:
    from celery.exceptions import InvalidTaskError

    payload = message.payload  # decodes; a disallowed content type (pickle) raises ContentDisallowed here
    if not (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and (payload[2] is None or isinstance(payload[2], dict))):
        raise InvalidTaskError(f"malformed task body ({type(payload).__name__}); expected [args, kwargs, embed]")


def guard_strategy(task) -> None:
    """Wrap ``task``'s message handler (in the worker's consumer) with :func:`_check_body`."""
    from celery.exceptions import InvalidTaskError
    from kombu.exceptions import ContentDisallowed, DecodeError

    start = task.start_strategy

    def start_strategy(app, consumer, **kwargs):
        handler = start(app, consumer, **kwargs)

        def guarded(message, body, *args, **kw):
            if body is None:  # protocol 2 (the only one we send): check before Celery unpacks it
                _check_body(message)
            try:
                return handler(message, body, *args, **kw)
            except (InvalidTaskError, ContentDisallowed, DecodeError):
                raise
            except Exception as exc:  # noqa: BLE001 - anything else here would stop the worker
                raise InvalidTaskError(f"malformed task message: {exc!r}"[:300]) from exc

        return guarded

    task.start_strategy = start_strategy


@signals.worker_init.connect
def _guard_messages(sender=None, **_kwargs) -> None:
    app = getattr(sender, "app", None) or __import__("worker.app", fromlist=["app"]).app
    for task in list(app.tasks.values()):
        guard_strategy(task)
