"""The retag producer: create a run, stream product ids by keyset pages, enqueue chunks, follow progress.

Memory does not grow with catalog size: ids are read one page at a time and sent as they come.
The database is the truth: ``resume`` re-enqueues whatever the run has not finished, so losing every
queued message loses no work.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from sqlalchemy import select, update

from catalog.db import session_factory, session_scope
from catalog.errors import NotFound, StyletagError
from catalog.runs import count_products_to_tag, create_run, get_run, iter_products_to_tag, run_as_dict
from catalog.schema import Product, TaggingRun, TagState
from catalog.settings import Settings
from catalog.tags import finish_run_if_complete

DEFAULT_CHUNK = 1024


def current_model_version(settings: Settings) -> str:
    """The model_version of the configured checkpoint, read from its metadata without torch."""
    from worker.modelinfo import checkpoint_metadata

    return checkpoint_metadata(settings)["model_version"]


def start_run(settings: Settings, *, scope: str, kind: str = "manual", model_version: str | None = None) -> int:
    version = model_version or current_model_version(settings)
    with session_scope(settings.database_url) as session:
        run = create_run(session, kind=kind, scope=scope, model_version=version)
        return run.id


def stream_run_ids(settings: Settings, run_id: int, *, resume: bool, page: int = 1000, count_total: bool = True):
    """Yield pages of ids of the run that are still to do; on a fresh run, grow its total as we go."""
    factory = session_factory(settings.database_url)
    with session_scope(settings.database_url) as session:
        run = get_run(session, run_id)
    for ids in iter_products_to_tag(factory, run, page=page, include_failed=resume):
        if count_total and not resume:
            with session_scope(settings.database_url) as session:
                r = session.get(TaggingRun, run_id, with_for_update=True)
                r.total += len(ids)
        yield ids


def mark_running(settings: Settings, run_id: int, *, retry_failed: bool = False) -> int:
    """Let workers finish the run. With ``retry_failed`` (a resume), the run's failed products are
    taken out of its ``failed`` counter and detached from it (``tag_state.run_id`` NULL; status and
    reason kept until they are retried), in one transaction: each then counts again, once, when it is
    retried, and the run is not done before they all have been. Returns how many were detached."""
    with session_scope(settings.database_url) as session:
        detached = _detach_failed(session, run_id) if retry_failed else 0
        run = session.get(TaggingRun, run_id, with_for_update=True)
        if run is None:
            raise NotFound(f"no run {run_id}")
        run.failed = run.failed - detached
        if retry_failed:
            # What a resume will send is what the run still has to do. Its total is recounted as done +
            # failed + that, so products its producer never reached (it died mid-enqueue: the total
            # grows page by page) are counted too. Writers wait on this row lock, so nothing is counted
            # twice: a product being written now is either still to do here or already in ``done``.
            run.total = run.done + run.failed + count_products_to_tag(session, run, include_failed=True)
        run.status = "running"
        run.finished_at = None
        finish_run_if_complete(session, run_id)
        return detached


def _detach_failed(session, run_id: int) -> int:
    # Lock the products first, in id order, as catalog.tags.write_batch does (no deadlock with a
    # worker writing one of them); a write waiting on them then sees them detached and counts once.
    session.execute(
        select(Product.id).join(TagState, TagState.product_id == Product.id)
        .where(TagState.run_id == run_id, TagState.status == "failed")
        .order_by(Product.id).with_for_update(of=Product)
    ).all()
    table = TagState.__table__
    result = session.execute(
        update(table).where(table.c.run_id == run_id, table.c.status == "failed").values(run_id=None)
    )
    return result.rowcount or 0


def enqueue_run(
    settings: Settings,
    run_id: int,
    *,
    resume: bool = False,
    chunk: int = DEFAULT_CHUNK,
    send: Callable[[int, list[int]], None] | None = None,
    progress: bool = False,
) -> int:
    """Send the run's ids to the ``bulk`` queue in chunks; returns how many ids were sent."""
    if send is None:
        send = _celery_sender(settings)
    sent = 0
    buffer: list[int] = []
    bar = _bar(progress, desc=f"enqueue run {run_id}", unit="products")
    if resume:
        mark_running(settings, run_id, retry_failed=True)
    for ids in stream_run_ids(settings, run_id, resume=resume):
        buffer.extend(ids)
        while len(buffer) >= chunk:
            send(run_id, buffer[:chunk])
            sent += chunk
            bar.update(chunk)
            del buffer[:chunk]
    if buffer:
        send(run_id, buffer)
        sent += len(buffer)
        bar.update(len(buffer))
    bar.close()
    if not resume:
        mark_running(settings, run_id)
    return sent


def _celery_sender(settings: Settings) -> Callable[[int, list[int]], None]:
    from kombu.exceptions import OperationalError as KombuOperationalError

    from worker.app import BULK_QUEUE, broker_connection
    from worker.tasks import tag_products

    def send(run_id: int, ids: list[int]) -> None:
        try:
            # The broker named by the settings, not whatever the app was configured with at import.
            with broker_connection(settings) as conn:
                tag_products.apply_async(args=(run_id, ids), queue=BULK_QUEUE, retry=True, connection=conn,
                                         retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_step": 1})
        except KombuOperationalError as exc:
            from catalog.errors import ServiceUnavailable
            from catalog.settings import redact_url

            raise ServiceUnavailable(
                f"cannot reach the broker at {redact_url(settings.broker_url)}: {str(exc).splitlines()[0][:120]}"
            ) from None

    return send


def run_inline(settings: Settings, run_id: int, *, resume: bool = False, progress: bool = True):
    """The embedded mode: the same pipeline in this process, no broker."""
    from worker.context import get_context
    from worker.pipeline import Pipeline

    ctx = get_context(settings)
    pipeline = Pipeline(ctx)
    bar = _bar(progress, desc=f"run {run_id}", unit="img")

    def ids():
        if resume:
            mark_running(settings, run_id, retry_failed=True)
        for page in stream_run_ids(settings, run_id, resume=resume):
            if bar is not None:
                bar.total = (bar.total or 0) + len(page)
                bar.refresh()
            yield from page
        if not resume:
            mark_running(settings, run_id)

    failed = 0

    def on_batch(b) -> None:
        nonlocal failed
        failed += b.failed
        bar.update(b.size)
        bar.set_postfix(failed=failed, refresh=False)

    t0 = time.perf_counter()
    report = pipeline.run(run_id, ids(), on_batch=on_batch)
    bar.close()
    with session_scope(settings.database_url) as session:
        finish_run_if_complete(session, run_id)
    report.wall_s = time.perf_counter() - t0
    return report


def wait_for_run(settings: Settings, run_id: int, *, progress: bool = True, poll: float = 1.0,
                 timeout: float | None = None) -> dict:
    """Follow a run's counters (done / failed / rate / ETA) until it finishes."""
    bar = _bar(progress, desc=f"run {run_id}", unit="img")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with session_scope(settings.database_url) as session:
            info = run_as_dict(get_run(session, run_id))
        if bar is not None:
            bar.total = info["total"]
            bar.n = info["done"] + info["failed"]
            bar.set_postfix(done=info["done"], failed=info["failed"], refresh=False)
            bar.refresh()
        if info["status"] in ("done", "cancelled"):
            bar.close()
            return info
        if deadline is not None and time.monotonic() > deadline:
            bar.close()
            raise StyletagError(
                f"run {run_id} not finished after {timeout:.0f}s ({info['done']} done, {info['failed']} failed "
                f"of {info['total']}); is a worker running? ('styletag worker')"
            )
        time.sleep(poll)


class _NullBar:
    total = 0
    n = 0

    def update(self, *_a, **_k): ...
    def refresh(self, *_a, **_k): ...
    def set_postfix(self, *_a, **_k): ...
    def close(self): ...


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, smoothing=0.1, **kwargs)
