"""Celery tasks. Thin shells: validate the message, then call the pipeline.

Tasks take ids and re-read rows, so a redelivered message leaves the same rows (the tag write is an
idempotent upsert that counts each product once per run). Transient database and storage errors
retry with exponential backoff; a bad image is recorded as failed and never retried.
"""

from __future__ import annotations

import logging
import time

from celery import signals
from celery.exceptions import Reject
from celery_batches import Batches
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


class InvalidMessage(ValueError):
    pass


def validate_ids(product_ids, *, limit: int = MAX_IDS_PER_TASK) -> list[int]:
    """Ids must be a list of positive ints, bounded in length; anything else is refused unexecuted."""
    if not isinstance(product_ids, list):
        raise InvalidMessage(f"product_ids must be a list, got {type(product_ids).__name__}")
    if len(product_ids) > limit:
        raise InvalidMessage(f"{len(product_ids)} ids in one message, over the limit of {limit}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in product_ids):
        raise InvalidMessage("product_ids must hold positive integers only")
    return list(dict.fromkeys(product_ids))


def validate_run_id(run_id) -> int | None:
    if run_id is None or (isinstance(run_id, int) and not isinstance(run_id, bool) and run_id > 0):
        return run_id
    raise InvalidMessage(f"run_id must be a positive integer or null, got {run_id!r}")


@signals.after_setup_logger.connect
def _scrub_worker_logs(logger=None, **_kwargs) -> None:
    """Secrets never reach a worker's log, whatever a library puts in an exception message."""
    from worker.logs import ScrubFilter

    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(ScrubFilter())


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

    t0 = time.perf_counter()
    report = Pipeline(get_context()).run(run_id, ids)
    elapsed = time.perf_counter() - t0
    log.info(
        "tag_products run=%s task=%s batch_size=%d tagged=%d failed=%d seconds=%.3f stages=%s",
        run_id, self.request.id, len(ids), report.tagged, report.failed, elapsed,
        {k: round(v, 3) for k, v in report.seconds.items()},
    )
    return {"tagged": report.tagged, "failed": report.failed}


@app.task(
    name="styletag.tag_uploads",
    base=Batches,
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
    log.info(
        "tag_uploads batch_size=%d tagged=%d failed=%d seconds=%.3f",
        len(ids), report.tagged, report.failed, time.perf_counter() - t0,
    )
