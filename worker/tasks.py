"""Celery tasks. Thin shells: validate the message, then call the pipeline (or the nightly producer).

Tasks take ids and re-read rows, so a redelivered message leaves the same rows (the tag write is an
idempotent upsert that counts each product once per run). Transient database and storage errors
retry with exponential backoff; a bad image is recorded as failed and never retried.

Models: a bulk task runs with its run's model (``Pipeline.for_run``: loaded by the registry's path when this
process does not hold it); a message of a finished or cancelled run is stale and does nothing. Uploads
are tagged with the active model, looked up at every flush; a batch whose write was refused because an
activation happened meanwhile is tagged again with the new model. A model that cannot be loaded
(``ModelUnavailable``) never loses a message: a bulk task is retried until it can (or its run is over), an
upload is sent again. A worker process checks its model before it consumes anything (``_check_model``):
without one it exits with :data:`EXIT_NO_MODEL` instead of taking messages it cannot serve.
"""

from __future__ import annotations

import logging
import sys
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
from worker.context import ModelUnavailable, get_context
from worker.messages import (
    InvalidMessage,
    enqueued_at,
    guard_strategy,
    upload_ids,
    validate_ids,
    validate_run_id,
)

log = logging.getLogger("styletag.tasks")

TRANSIENT = (ServiceUnavailable, OperationalError, InterfaceError)
UPLOAD_MAX_ATTEMPTS = 8
MODEL_RETRY_MAX_S = 60  # a task waiting for its model to become loadable retries at most this far apart
EXIT_NO_MODEL = 3  # the worker process's exit code when it has no model to serve
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


@signals.worker_init.connect
def _check_model(sender=None, **_kwargs) -> None:
    """In the worker's main process, before the pool forks and before anything is consumed: is there a
    model to serve (the configured checkpoint readable, the registry's active model readable, without
    torch)? If not, exit (code EXIT_NO_MODEL) with one line saying why: the launcher and the container show
    it, and no message is taken. (The pool's own load, with torch, is ``_load_model_once``.)"""
    from catalog.errors import StyletagError
    from catalog.settings import Settings
    from worker.context import preflight

    settings = Settings.from_env()
    try:
        what = preflight(settings)
    except StyletagError as exc:
        # Celery has not set up logging yet: one plain line on stderr, what the launcher and the container show.
        print(f"error: worker has no model to serve: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_MODEL) from None
    finally:
        from catalog.db import engine_for

        engine_for(settings.database_url).dispose()  # no connection of the parent crosses the fork
    log.info("model check: %s", what)


@signals.worker_process_init.connect
def _load_model_once(**_kwargs) -> None:
    """Load the active model in each pool child after the fork (the parent never touches torch or CUDA)."""
    from worker.ops.metrics import start_worker_metrics

    ctx = get_context()
    try:
        loaded = ctx.model()
        start_worker_metrics(ctx.settings, loaded.version, loaded.predictor.backbone)
    except Exception as exc:  # tasks raise ModelUnavailable and retry; nothing is lost
        log.error("worker warm-up failed (tasks will retry until the model loads): %s", exc)


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
    try:
        pipeline = Pipeline.for_run(get_context(), run_id)
    except ModelUnavailable as exc:
        retries = self.request.retries or 0
        log.error("tag_products run=%s task=%s: %s; retrying", run_id, self.request.id, exc.message,
                  extra={"run_id": run_id, "task_id": self.request.id, "retries": retries})
        raise self.retry(exc=exc, countdown=min(MODEL_RETRY_MAX_S, 2 ** min(retries, 6)), max_retries=None) \
            from None
    if pipeline is None:  # the run is finished, cancelled (superseded) or gone: nothing to write
        from worker.pipeline import PipelineReport

        report, version = PipelineReport(stale=len(ids)), "-"
    else:
        report, version = pipeline.run(run_id, ids), pipeline.model_version
    elapsed = time.perf_counter() - t0
    log.info(
        "tag_products run=%s task=%s model=%s batch_size=%d tagged=%d failed=%d review=%d skipped=%d stale=%d "
        "redelivered=%s retries=%d seconds=%.3f stages=%s",
        run_id, self.request.id, version, len(ids), report.tagged, report.failed, report.review,
        report.skipped, report.stale, redelivered, self.request.retries or 0, elapsed,
        {k: round(v, 3) for k, v in report.seconds.items()},
        extra={"run_id": run_id, "task_id": self.request.id, "model_version": version,
               "batch_size": len(ids), "tagged": report.tagged, "failed": report.failed, "review": report.review,
               "skipped": report.skipped, "stale": report.stale, "redelivered": redelivered,
               "retries": self.request.retries or 0, "seconds": round(elapsed, 3),
               "stages": {k: round(v, 3) for k, v in report.seconds.items()}},
    )
    return {"tagged": report.tagged, "failed": report.failed, "stale": report.stale}


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
    """Micro-batched uploads: each message holds one product id, or a few (``worker.messages.upload_ids``: a
    burst enqueued in one call); one pipeline run per flush."""
    from worker.pipeline import Pipeline

    ids: list[int] = []
    attempts: dict[int, int] = {}
    enqueued: dict[int, float | None] = {}  # for styletag_upload_latency_seconds
    for req in requests:
        try:
            args = list(req.args or ())
            kwargs = dict(req.kwargs or {})
            attempt = kwargs.get("attempt", 0)
            attempt = int(attempt) if isinstance(attempt, int) else 0
            sent_at = enqueued_at(kwargs)
            for pid in upload_ids(args, kwargs):
                attempts[pid] = attempt
                enqueued[pid] = enqueued.get(pid) or sent_at
                ids.append(pid)
        except (InvalidMessage, IndexError, TypeError, ValueError) as exc:
            log.error("refused upload message %s: %s", req.id, exc)
    ids = list(dict.fromkeys(ids))
    if not ids:
        return
    t0 = time.perf_counter()
    try:
        pipeline = Pipeline(get_context())  # the active model, looked up now
        report = pipeline.run(None, ids)
        if report.stale_ids:  # an activation happened while the batch ran: tag it with the new model
            again = Pipeline(get_context()).run(None, report.stale_ids)
            report.tagged, report.failed, report.stale = report.tagged + again.tagged, report.failed + again.failed, \
                again.stale
    except TRANSIENT as exc:
        # Re-send each id with a growing delay; the database stays the truth if this is lost too. A missing
        # model is waited for without a limit: the upload is never dropped for it.
        from worker.producers.send import TAG_UPLOADS, Sender

        no_model = isinstance(exc, ModelUnavailable)
        dropped = 0
        with Sender(get_context().settings) as retry:
            for pid in ids:
                attempt = attempts.get(pid, 0) + 1
                if attempt <= UPLOAD_MAX_ATTEMPTS or no_model:
                    retry(TAG_UPLOADS, (pid,), {"attempt": attempt, "enqueued_at": enqueued.get(pid)}, countdown=min(60, 2 ** min(attempt, 6)),
                          queue=UPLOADS_QUEUE)
                else:
                    dropped += 1
        log.warning("uploads batch of %d will retry (%d dropped after %d attempts: untagged, the next "
                    "'retag --changed-only' tags them): %s", len(ids) - dropped, dropped, UPLOAD_MAX_ATTEMPTS,
                    str(exc).splitlines()[0][:200])
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
