"""The tagging pipeline: product ids -> rows -> fetch -> decode -> batch -> model -> one write per batch.

One code path serves Celery tasks and the inline mode. Stages overlap: while the model runs batch k,
batch k+1 is fetched and decoded by a thread pool, and batch k-1 is written by a writer thread.
A product whose image is missing, corrupt or refused is recorded as failed with its reason; the rest
of its batch is tagged.

CPU-bound work is kept to one runnable thread per core, so that the stages share the cores instead of
fighting over them (measured in docs/performance.md): at most ``os.cpu_count()`` of the fetch threads
decode at a time (the others wait in I/O, which S3 needs many of), and on a CPU device the model runs
as ``ctx.model_threads`` threads over slices of the batch, each with one intra-op thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np

from catalog.db import session_scope
from catalog.errors import BadImage, StorageError, TransientStorageError, failure_reason
from catalog.products import ProductImage, images_for_tagging
from catalog.runs import finish_if_complete
from catalog.tags import ProductFailure, ProductTags, Tag, write_batch
from worker.ops.metrics import observe_batch

log = logging.getLogger("styletag.pipeline")

Item = ProductImage  # one product of a batch: id, sku, image URI and version


@dataclass
class Prepared:
    items: list[Item]
    arrays: list[np.ndarray]
    failures: list[ProductFailure]
    transient: int
    fetch_s: float
    decode_s: float
    wall_s: float


@dataclass
class BatchReport:
    size: int
    tagged: int
    failed: int
    skipped_newer: int
    seconds: dict[str, float]
    failures: list[ProductFailure] = field(default_factory=list)


@dataclass
class PipelineReport:
    products: int = 0
    tagged: int = 0
    failed: int = 0
    skipped_newer: int = 0
    batches: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("fetch", "decode", "model", "write", "wall"), 0.0)
    )
    batch_sizes: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    def add(self, b: BatchReport) -> None:
        self.products += b.size
        self.tagged += b.tagged
        self.failed += b.failed
        self.skipped_newer += b.skipped_newer
        self.batches += 1
        self.batch_sizes.append(b.size)
        for k, v in b.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


def chunked(ids: Iterable[int], size: int) -> Iterator[list[int]]:
    it = iter(ids)
    while chunk := list(islice(it, size)):
        yield chunk


def load_items(database_url: str, ids: list[int]) -> list[Item]:
    """Re-read the rows: a task carries only ids, the database is the truth. Unknown ids are dropped."""
    with session_scope(database_url) as session:
        return images_for_tagging(session, ids)


class Pipeline:
    """Runs batches through the stages with bounded look-ahead (memory stays flat whatever the input)."""

    def __init__(self, ctx, *, lookahead: int = 2):
        self.ctx = ctx
        self.settings = ctx.settings
        self.predictor = ctx.predictor
        self.labels = ctx.labels
        self.reader = ctx.reader
        self.lookahead = lookahead
        self.model_threads = max(1, int(getattr(ctx, "model_threads", 1) or 1))
        # Fetch threads wait on I/O; decoding is CPU work: no more decoders at once than cores
        # (STYLETAG_DECODE_THREADS overrides; 0 = the cores).
        decoders = int(getattr(self.settings, "decode_threads", 0) or 0) or (os.cpu_count() or 1)
        self._decoders = threading.BoundedSemaphore(max(1, decoders))
        self._model_pool: ThreadPoolExecutor | None = None
        # product id -> the version of the image bytes a fetch read (recorded in tag_state.image_version)
        self._versions: dict[int, str] = {}

    # -- stages ---------------------------------------------------------------------------------
    def _fetch_decode(self, item: Item) -> tuple[np.ndarray | None, BaseException | None, float, float]:
        from worker.decode import decode_image

        t0 = time.perf_counter()
        try:
            fetched = self.reader.fetch(item.uri)  # the bytes and the version of exactly those bytes
            data, self._versions[item.product_id] = fetched.data, fetched.version
        except (StorageError, BadImage) as exc:
            return None, exc, time.perf_counter() - t0, 0.0
        except Exception as exc:  # noqa: BLE001 - one item's failure is that item's failure, never its batch's
            return None, exc, time.perf_counter() - t0, 0.0
        t1 = time.perf_counter()
        p = self.predictor
        with self._decoders:  # the wait for a free core counts as neither stage
            t2 = time.perf_counter()
            try:
                arr = decode_image(data, p.input_size, p.channels, self.settings.max_image_pixels)
            except Exception as exc:  # noqa: BLE001 - BadImage, or anything a decoder raises on one image
                return None, exc, t1 - t0, time.perf_counter() - t2
            return arr, None, t1 - t0, time.perf_counter() - t2

    def prepare(self, ids: list[int], pool: ThreadPoolExecutor) -> Prepared:
        t0 = time.perf_counter()
        items = load_items(self.settings.database_url, ids)
        results = list(pool.map(self._fetch_decode, items))
        # What the worker read is what it records: the fetched version, else the catalog's (nothing read).
        items = [replace(it, image_version=self._versions.pop(it.product_id, it.image_version)) for it in items]
        ok_items, arrays, failures = [], [], []
        transient = 0
        fetch_s = decode_s = 0.0
        for item, (arr, exc, fs, ds) in zip(items, results, strict=True):
            fetch_s += fs
            decode_s += ds
            if exc is None:
                ok_items.append(item)
                arrays.append(arr)
            else:
                transient += isinstance(exc, TransientStorageError)
                message = str(exc) if isinstance(exc, StorageError | BadImage) else f"{exc.__class__.__name__}: {exc}"
                failures.append(ProductFailure(item.product_id, item.image_version, failure_reason(exc), message[:500]))
        if items and transient == len(items):
            # The store is down, not the images: let the task retry with backoff.
            raise TransientStorageError(f"all {transient} images of the batch unreachable: {failures[0].error}")
        return Prepared(ok_items, arrays, failures, transient, fetch_s, decode_s, time.perf_counter() - t0)

    MIN_SLICE = 8  # images per model thread below which splitting a batch costs more than it gains

    def predict(self, batch: np.ndarray) -> list:
        """``predictor.predict`` over the batch; on a CPU device split into up to ``model_threads``
        slices that run concurrently (torch releases the GIL inside each operator). Per-image results do
        not depend on the split: the model is in eval mode."""
        k = min(self.model_threads, len(batch) // self.MIN_SLICE)
        if k <= 1:
            return self.predictor.predict(batch)
        if self._model_pool is None:
            self._model_pool = ThreadPoolExecutor(self.model_threads - 1, thread_name_prefix="styletag-model")
        parts = np.array_split(batch, k)
        futures = [self._model_pool.submit(self.predictor.predict, part) for part in parts[1:]]
        preds = self.predictor.predict(parts[0])
        for f in futures:
            preds.extend(f.result())
        return preds

    def close(self) -> None:
        if self._model_pool is not None:
            self._model_pool.shutdown(wait=True)
            self._model_pool = None

    def infer(self, prepared: Prepared) -> tuple[list[ProductTags], float]:
        if not prepared.arrays:
            return [], 0.0
        t0 = time.perf_counter()
        preds = self.predict(np.stack(prepared.arrays))
        coarse_ids, fine_ids = self.labels.coarse_ids, self.labels.fine_ids
        tagged = []
        for item, pred in zip(prepared.items, preds, strict=True):
            tags = [Tag(coarse_ids[i], float(s), i == pred.primary_coarse) for i, s in pred.coarse_tags]
            tags += [Tag(fine_ids[i], float(s), i == pred.primary_fine) for i, s in pred.fine_tags]
            tagged.append(ProductTags(item.product_id, item.image_version, tags))
        return tagged, time.perf_counter() - t0

    def write(self, run_id: int | None, prepared: Prepared, tagged: list[ProductTags], model_s: float) -> BatchReport:
        t0 = time.perf_counter()
        with session_scope(self.settings.database_url) as session:
            outcome = write_batch(
                session,
                run_id=run_id,
                model_version=self.predictor.model_version,
                tagged=tagged,
                failed=prepared.failures,
            )
            if run_id is not None:
                finish_if_complete(session, run_id)
        write_s = time.perf_counter() - t0
        return BatchReport(
            size=len(prepared.items) + len(prepared.failures),
            tagged=outcome.tagged,
            failed=outcome.failed,
            skipped_newer=outcome.skipped_newer,
            seconds={"fetch": prepared.fetch_s, "decode": prepared.decode_s, "model": model_s, "write": write_s},
            failures=prepared.failures,
        )

    # -- driver ---------------------------------------------------------------------------------
    def run(
        self,
        run_id: int | None,
        ids: Iterable[int],
        *,
        on_batch: Callable[[BatchReport], None] | None = None,
    ) -> PipelineReport:
        """Tag every id; overlapping prepare (k+1), model (k) and write (k-1)."""
        report = PipelineReport()
        batches = chunked(ids, self.settings.batch_size)
        io_threads = max(1, self.settings.fetch_threads)
        with (
            ThreadPoolExecutor(io_threads, thread_name_prefix="styletag-io") as io_pool,
            ThreadPoolExecutor(1, thread_name_prefix="styletag-prep") as prep_pool,
            ThreadPoolExecutor(1, thread_name_prefix="styletag-write") as write_pool,
        ):
            pending: deque[Future[Prepared]] = deque()
            writes: deque[Future[BatchReport]] = deque()

            def fill() -> None:
                while len(pending) < self.lookahead:
                    chunk = next(batches, None)
                    if chunk is None:
                        return
                    pending.append(prep_pool.submit(self.prepare, chunk, io_pool))

            last = time.perf_counter()

            def drain(limit: int) -> None:
                nonlocal last
                while len(writes) > limit:
                    b = writes.popleft().result()
                    now = time.perf_counter()
                    b.seconds["wall"] = now - last
                    last = now
                    report.add(b)
                    observe_batch(b)
                    if on_batch is not None:
                        on_batch(b)

            try:
                fill()
                while pending:
                    prepared = pending.popleft().result()
                    fill()
                    tagged, model_s = self.infer(prepared)
                    writes.append(write_pool.submit(self.write, run_id, prepared, tagged, model_s))
                    drain(1)
                drain(0)
            except BaseException:
                for f in list(pending) + list(writes):
                    f.cancel()
                # Let in-flight writes finish (each is its own transaction) before propagating.
                for f in writes:
                    if not f.cancelled():
                        try:
                            f.result()
                        except BaseException:  # noqa: S110 - the first error is the one we raise
                            pass
                raise
            finally:
                self.close()
        return report
