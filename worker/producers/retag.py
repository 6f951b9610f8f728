"""The retag producer: create a run, stream product ids by keyset pages, enqueue chunks, follow progress.

Memory does not grow with catalog size: ids are read one page at a time and sent as they come.
The database is the truth: ``resume`` re-enqueues whatever the run has not finished, so losing every
queued message loses no work. Every change to the run goes through ``catalog.runs``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from catalog import runs
from catalog.db import session_factory, session_scope
from catalog.errors import StyletagError
from catalog.settings import Settings
from worker.app import BULK_QUEUE
from worker.producers.send import TAG_PRODUCTS, Sender

DEFAULT_CHUNK = 1024


def current_model_version(settings: Settings) -> str:
    """The version of the model runs are made with: the registry's active model of the served taxonomy
    (``worker.context.served_taxonomy``; an empty registry is bootstrapped with the configured checkpoint)."""
    from worker.context import ensure_serving

    return ensure_serving(settings).version


def check_image_versions(settings: Settings, *, progress: bool = False):
    """The pass before a ``--changed-only`` run: HEAD every non-archived product's image and record the
    versions that changed (a photo replaced behind an unchanged URI), so the run picks those products up.
    Returns ``catalog.products.ImageCheck`` counts."""
    from catalog.products import refresh_image_versions

    return refresh_image_versions(settings, progress=progress)


def start_run(settings: Settings, *, scope: str, kind: str = "manual", model_version: str | None = None) -> int:
    """A new run of the active model (or of ``model_version``, e.g. a shadow run's). An empty registry is
    bootstrapped first either way, so a caller naming the configured checkpoint's version finds it registered."""
    version = current_model_version(settings)
    version = model_version or version
    with session_scope(settings.database_url) as session:
        from catalog.models import get_model

        version = get_model(session, version).version  # an unknown version: one NotFound line, no run
        return runs.create_run(session, kind=kind, scope=scope, model_version=version).id


def stream_run_ids(settings: Settings, run_id: int, *, resume: bool, page: int = 1000):
    """Yield pages of ids of the run that are still to do; on a fresh run, grow its total as we go."""
    with session_scope(settings.database_url) as session:
        run = runs.get_run(session, run_id)
    for ids in runs.iter_products_to_tag(session_factory(settings.database_url), run, page=page,
                                         include_failed=resume):
        if not resume:
            with session_scope(settings.database_url) as session:
                runs.add_to_total(session, run_id, len(ids))
        yield ids


def mark_running(settings: Settings, run_id: int, *, retry_failed: bool = False) -> int:
    """Let workers finish the run (see ``catalog.runs.mark_running``); returns how many failed products
    a resume detached to retry them."""
    with session_scope(settings.database_url) as session:
        return runs.mark_running(session, run_id, retry_failed=retry_failed)


def enqueue_run(
    settings: Settings,
    run_id: int,
    *,
    resume: bool = False,
    chunk: int = DEFAULT_CHUNK,
    send: Callable[..., None] | None = None,
    progress: bool = False,
) -> int:
    """Send the run's ids to the ``bulk`` queue in chunks; returns how many ids were sent. ``send`` is a
    :class:`~worker.producers.send.Sender` already open (the nightly producer's, which refreshes its lock)."""
    if not 1 <= chunk <= settings.max_ids_per_task:
        raise StyletagError(f"chunk must be between 1 and {settings.max_ids_per_task} product ids "
                            f"(STYLETAG_MAX_IDS_PER_TASK), got {chunk}")
    if send is None:
        with Sender(settings) as sender:
            return enqueue_run(settings, run_id, resume=resume, chunk=chunk, send=sender, progress=progress)
    sent = 0
    buffer: list[int] = []
    bar = _bar(progress, desc=f"enqueue run {run_id}", unit="products")
    if resume:
        mark_running(settings, run_id, retry_failed=True)
    for ids in stream_run_ids(settings, run_id, resume=resume):
        buffer.extend(ids)
        while len(buffer) >= chunk:
            send(TAG_PRODUCTS, (run_id, buffer[:chunk]), queue=BULK_QUEUE)
            sent += chunk
            bar.update(chunk)
            del buffer[:chunk]
    if buffer:
        send(TAG_PRODUCTS, (run_id, buffer), queue=BULK_QUEUE)
        sent += len(buffer)
        bar.update(len(buffer))
    bar.close()
    if not resume:
        mark_running(settings, run_id)
    return sent


def run_inline(settings: Settings, run_id: int, *, resume: bool = False, progress: bool = True):
    """The embedded mode: the same pipeline in this process, no broker."""
    from worker.context import get_context
    from worker.pipeline import Pipeline

    ctx = get_context(settings)
    if resume:  # reopens the run first: the pipeline serves unfinished runs only
        mark_running(settings, run_id, retry_failed=True)
    pipeline = Pipeline.for_run(ctx, run_id)
    if pipeline is None:
        raise StyletagError(f"run {run_id} is finished or cancelled; nothing to tag ('styletag runs {run_id}')")
    bar = _bar(progress, desc=f"run {run_id}", unit="img")

    def ids():
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
        runs.finish_if_complete(session, run_id)
    report.wall_s = time.perf_counter() - t0
    return report


def wait_for_run(settings: Settings, run_id: int, *, progress: bool = True, poll: float = 1.0,
                 timeout: float | None = None) -> dict:
    """Follow a run's counters (done / failed / rate / ETA) until it finishes."""
    bar = _bar(progress, desc=f"run {run_id}", unit="img")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with session_scope(settings.database_url) as session:
            info = runs.run_as_dict(runs.get_run(session, run_id))
        if bar is not None:
            bar.total = info["total"]
            bar.n = info["done"] + info["failed"]
            bar.set_postfix(done=info["done"], failed=info["failed"], refresh=False)
            bar.refresh()
        if info["status"] in (runs.RunStatus.DONE, runs.RunStatus.CANCELLED):
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
