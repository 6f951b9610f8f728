"""Celery tasks. Thin shells: validate the message, then call the pipeline (or the nightly producer).

Tasks take ids and re-read rows, so a redelivered message leaves the same rows (the tag write is an
idempotent upsert that counts each product once per run). Transient database and storage errors
retry with exponential backoff; a bad image is recorded as failed and never retried.
"""

from __future__ import annotations

import logging
import time

from celery import signals
from celery.exceptions import Reject
from sqlalchemy.exc import InterfaceError, OperationalError

from catalog.errors import ServiceUnavailable
from worker.app import (
    BULK_SOFT_TIME_LIMIT,
    BULK_TIME_LIMIT,
    UPLOAD_FLUSH_EVERY,
    UPLOAD_FLUSH_INTERVAL,
    UPLOADS_QUEUE,
    app,
)
from worker.batching import CoalescingBatches
from worker.context import get_context
from worker.messages import InvalidMessage, enqueued_at, guard_strategy, validate_ids, validate_run_id

log = logging.getLogger("styletag.tasks")

TRANSIENT = (ServiceUnavailable, OperationalError, InterfaceError)
UPLOAD_MAX_ATTEMPTS = 8
# Enqueueing 10 million ids takes minutes; the nightly start must not be killed by the 15-minute default.
NIGHTLY_SOFT_TIME_LIMIT = 4 * 3600


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _scrub_worker_logs(logger=None, **_kwargs) -> None:
    """Secrets never reach a worker's log, whatever a library puts in an exception message; JSON lines
    when STYLETAG_LOG_JSON is set (worker/ops/logs.py)."""
    from worker.ops.logs import setup_celery_logger

    setup_celery_logger(logger)


@signals.celeryd_init.connect
def _early_worker_logs(**_kwargs) -> None:
    """With STYLETAG_LOG_JSON, warnings Celery gives before it sets up logging are JSON lines too."""
    from worker.ops.logs import setup_early_logging

    setup_early_logging()


@signals.worker_process_init.connect
def _load_model_once(**_kwargs) -> None:
    """Load the model in each pool child after the fork (the parent never touches torch or CUDA)."""
    from worker.ops.metrics import start_worker_metrics

    ctx = get_context()
    try:
        _ = ctx.labels
        start_worker_metrics(ctx.settings, ctx.predictor.model_version, ctx.predictor.backbone)
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
    enqueued: dict[int, float | None] = {}  # for styletag_upload_latency_seconds
    for req in requests:
        try:
            args = list(req.args or ())
            kwargs = dict(req.kwargs or {})
            pid = args[0] if args else kwargs.get("product_id")
            (pid,) = validate_ids([pid], limit=1)
            attempts[pid] = int(kwargs.get("attempt", 0)) if isinstance(kwargs.get("attempt", 0), int) else 0
            enqueued[pid] = enqueued.get(pid) or enqueued_at(kwargs)
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
        from worker.producers.send import TAG_UPLOADS, Sender

        with Sender(get_context().settings) as retry:
            for pid in ids:
                attempt = attempts.get(pid, 0) + 1
                if attempt <= UPLOAD_MAX_ATTEMPTS:
                    retry(TAG_UPLOADS, (pid,), {"attempt": attempt, "enqueued_at": enqueued.get(pid)}, countdown=min(60, 2**attempt),
                          queue=UPLOADS_QUEUE)
        log.warning("uploads batch of %d will retry: %s", len(ids), str(exc).splitlines()[0][:200])
        return
    elapsed = time.perf_counter() - t0
    from worker.ops.metrics import observe_upload_latency

    observe_upload_latency([t for t in enqueued.values() if t is not None])  # the batch's write committed
    log.info(
        "tag_uploads batch_size=%d tagged=%d failed=%d seconds=%.3f",
        len(ids), report.tagged, report.failed, elapsed,
        extra={"batch_size": len(ids), "tagged": report.tagged, "failed": report.failed, "seconds": round(elapsed, 3),
               "stages": {k: round(v, 3) for k, v in report.seconds.items()}},
    )


@app.task(name="styletag.nightly_retag", acks_late=True, ignore_result=True, soft_time_limit=NIGHTLY_SOFT_TIME_LIMIT,
          time_limit=NIGHTLY_SOFT_TIME_LIMIT + 60)
def nightly_retag() -> dict:
    """Beat's nightly start (``worker.ops.beat``): a ``--changed-only`` run unless one is still going."""
    from catalog.settings import Settings
    from worker.producers.nightly import start_nightly

    return start_nightly(Settings.from_env())


@signals.worker_init.connect
def _guard_messages(sender=None, **_kwargs) -> None:
    app = getattr(sender, "app", None) or __import__("worker.app", fromlist=["app"]).app
    for task in list(app.tasks.values()):
        guard_strategy(task)
