"""The tagging pipeline: product ids -> rows -> fetch -> decode -> batch -> model -> one write per batch.

One code path serves Celery tasks and the inline mode. Stages overlap: while the model runs batch k,
batch k+1 is fetched and decoded by a thread pool, and batch k-1 is written by a writer thread.
A product whose image is missing, corrupt or refused is recorded as failed with its reason; the rest
of its batch is tagged.

CPU-bound work is kept to one runnable thread per core, so that the stages share the cores instead of
fighting over them (measured in docs/performance.md): at most ``usable_cores()`` of the fetch threads
decode at a time (the others wait in I/O, which S3 needs many of), and on a CPU device the model runs
as ``ctx.model_threads`` threads over slices of the batch, each with one intra-op thread.
"""

from __future__ import annotations

import logging
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
from catalog.runs import finish_if_complete, run_model
from catalog.settings import usable_cores
from catalog.tags import ProductFailure, ProductTags, StaleWrite, Tag, WriteOutcome, write_batch
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
    # per item of ``items``: the garment's colours the preprocessing named (model.preprocess.Decoded.colours;
    # None when the model tags no colours)
    colours: list = field(default_factory=list)


@dataclass
class BatchReport:
    size: int
    tagged: int
    failed: int
    seconds: dict[str, float]
    failures: list[ProductFailure] = field(default_factory=list)
    review: int = 0  # of tagged: held for review
    skipped: int = 0  # archived or deleted since enqueued
    stale: int = 0  # not written: the model is no longer active, or the run is over (catalog.tags)
    stale_ids: list[int] = field(default_factory=list)


@dataclass
class PipelineReport:
    products: int = 0
    tagged: int = 0
    failed: int = 0
    review: int = 0
    skipped: int = 0
    stale: int = 0
    stale_ids: list[int] = field(default_factory=list)
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
        self.review += b.review
        self.skipped += b.skipped
        self.stale += b.stale
        self.stale_ids += b.stale_ids
        self.batches += 1
        self.batch_sizes.append(b.size)
        for k, v in b.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


def _threshold(*values) -> float | None:
    for v in values:
        if v is not None:
            try:
                return float(v)
            except (TypeError, ValueError):
                log.warning("ignoring a review threshold that is not a number: %r", v)
    return None


def chunked(ids: Iterable[int], size: int) -> Iterator[list[int]]:
    it = iter(ids)
    while chunk := list(islice(it, size)):
        yield chunk


def load_items(database_url: str, ids: list[int]) -> list[Item]:
    """Re-read the rows: a task carries only ids, the database is the truth. Unknown ids are dropped."""
    with session_scope(database_url) as session:
        return images_for_tagging(session, ids)


class Pipeline:
    """Runs batches through the stages with bounded look-ahead (memory stays flat whatever the input).

    One model per pipeline: ``model_version`` (a run's model; default the active model of the worker's
    taxonomy, ``ctx.model``). ``shadow``: predictions go to ``shadow_tags`` only (``catalog.shadow``)."""

    def __init__(self, ctx, *, lookahead: int = 2, model_version: str | None = None, shadow: bool = False):
        self.ctx = ctx
        self.settings = ctx.settings
        if hasattr(ctx, "model"):
            loaded = ctx.model(model_version)
            self.model_version, self.predictor, self.labels = loaded.version, loaded.predictor, loaded.labels
        else:  # a bare context (benches, tests): its one predictor and labels
            self.predictor, self.labels = ctx.predictor, ctx.labels
            self.model_version = model_version or getattr(self.predictor, "model_version", None)
        self.shadow = shadow
        meta = getattr(self.predictor, "meta", None) or {}
        # Review rule (catalog.tags): under review_threshold -> low_confidence; under ood_threshold (or a
        # predictor that flags it) -> out_of_distribution. Without thresholds nothing is held.
        self.review_threshold = _threshold(getattr(self.predictor, "review_threshold", None),
                                           meta.get("review_threshold"))
        self.ood_threshold = _threshold(getattr(self.predictor, "ood_threshold", None), meta.get("ood_threshold"))
        # The one preprocessing (model.preprocess), as the serving checkpoint defines it: what training fed
        # the network. Colour tags (model.predictor.ColourTagging) come from the same decode, the backdrop
        # fitted once per image. (A bare context without a predictor has no spec: it decodes nothing.)
        from model.preprocess import PreprocessSpec

        self.spec = getattr(self.predictor, "spec", None) or (PreprocessSpec.from_checkpoint_meta(meta) if meta
                                                              else None)
        self.colours = getattr(self.predictor, "colours", None)
        self.colour_ids: dict[str, int] = {}
        if self.colours is not None:
            by_name = getattr(self.labels, "by_name", {})
            self.colour_ids = {n: by_name[("colour", n)] for n in self.colours.palette if ("colour", n) in by_name}
            if len(self.colour_ids) < len(self.colours.palette):  # a bare context that did not sync them
                log.warning("catalog lacks colour labels %s of taxonomy %s: those colours are not tagged",
                            sorted(set(self.colours.palette) - set(self.colour_ids)),
                            getattr(self.labels, "taxonomy", "?"))
        self.reader = ctx.reader
        # A photo's decode in decoder processes (worker/decode_pool.py), else on the fetch threads
        self.decode_pool = ctx.decode_pool(self.spec, colour_names=self.colours is not None) \
            if hasattr(ctx, "decode_pool") and self.spec is not None else None
        self.lookahead = lookahead
        self.model_threads = max(1, int(getattr(ctx, "model_threads", 1) or 1))
        # Fetch threads wait on I/O; decoding is CPU work: no more decoders at once than cores
        # (STYLETAG_DECODE_THREADS overrides; 0 = the cores).
        decoders = int(getattr(self.settings, "decode_threads", 0) or 0) or usable_cores()
        self._decoders = threading.BoundedSemaphore(max(1, decoders))
        self._model_pool: ThreadPoolExecutor | None = None
        # product id -> the version of the image bytes a fetch read (recorded in tag_state.image_version)
        self._versions: dict[int, str] = {}

    @classmethod
    def for_run(cls, ctx, run_id: int | None, **kwargs) -> Pipeline | None:
        """The pipeline of a run: its own model (shadow runs write shadow predictions). None when the run
        is gone or finished: its messages are stale and nothing is to be done."""
        if run_id is None:
            return cls(ctx, **kwargs)
        with session_scope(ctx.settings.database_url) as session:
            info = run_model(session, run_id)
        if info is None or info[2] not in ("enqueuing", "running"):
            return None
        version, kind, _ = info
        return cls(ctx, model_version=version, shadow=kind == "shadow", **kwargs)

    # -- stages ---------------------------------------------------------------------------------
    def _fetch(self, item: Item) -> tuple[bytes | None, BaseException | None, float]:
        """(the image's bytes or None, the item's error or None, fetch seconds)."""
        t0 = time.perf_counter()
        try:
            fetched = self.reader.fetch(item.uri)  # the bytes and the version of exactly those bytes
            self._versions[item.product_id] = fetched.version
            return fetched.data, None, time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - one item's failure is that item's failure, never its batch's
            return None, exc, time.perf_counter() - t0

    def _decode_kwargs(self) -> dict:
        c = self.colours
        return {"colours": c is not None, "max_colours": c.max_colours if c else 2,
                "min_share": c.min_share if c else 0.25}

    def _fetch_decode(self, item: Item) -> tuple[object | None, BaseException | None, float, float]:
        """(model.preprocess.Decoded or None, the item's error or None, fetch seconds, decode seconds): on this
        thread, with at most ``decode_threads`` decoding at once."""
        from model.preprocess import decode

        data, exc, fetch_s = self._fetch(item)
        if exc is not None:
            return None, exc, fetch_s, 0.0
        with self._decoders:  # the wait for a free core counts as neither stage
            t2 = time.perf_counter()
            try:
                decoded = decode(data, self.spec, self.settings.max_image_pixels, **self._decode_kwargs())
            except Exception as exc:  # noqa: BLE001 - BadImage, or anything a decoder raises on one image
                return None, exc, fetch_s, time.perf_counter() - t2
            return decoded, None, fetch_s, time.perf_counter() - t2

    def _fetch_decode_each(self, items: list[Item]) -> list[tuple[object | None, BaseException | None, float, float]]:
        return [self._fetch_decode(item) for item in items]

    def _fetch_decode_chunk(self, items: list[Item]) -> list[tuple[object | None, BaseException | None, float, float]]:
        """:meth:`_fetch_decode` of a few items, fetched on this thread one after the other and then decoded in
        one round trip to a decoder process (``worker.decode_pool``)."""
        fetched = [self._fetch(item) for item in items]
        ok = [i for i, (_, exc, _) in enumerate(fetched) if exc is None]
        t0 = time.perf_counter()
        decoded = self.decode_pool.decode_many([fetched[i][0] for i in ok], self.spec,
                                               self.settings.max_image_pixels, **self._decode_kwargs()) if ok else []
        each = (time.perf_counter() - t0) / max(1, len(ok))
        out = [(None, exc, fs, 0.0) for _, exc, fs in fetched]
        for i, dec in zip(ok, decoded, strict=True):
            out[i] = (None, dec, fetched[i][2], each) if isinstance(dec, BaseException) else (dec, None,
                                                                                              fetched[i][2], each)
        return out

    def _chunk_size(self, n: int) -> int:
        """Images per hand-over to a decoder process: up to 16, and at least two chunks per decoder process
        so that every process has work (a lone upload is a chunk of one)."""
        return max(1, min(16, n // (2 * self.decode_pool.procs)))

    def prepare(self, ids: list[int], pool: ThreadPoolExecutor) -> Prepared:
        t0 = time.perf_counter()
        items = load_items(self.settings.database_url, ids)
        if self.decode_pool is not None:
            size, work = self._chunk_size(len(items)), self._fetch_decode_chunk
        else:  # a few items per task: a task hand-off costs more than reading and decoding a small image
            size = max(1, min(8, len(items) // (2 * max(1, self.settings.fetch_threads))))
            work = self._fetch_decode_each
        results = [r for part in pool.map(work, chunked(items, size)) for r in part]
        # What the worker read is what it records: the fetched version, else the catalog's (nothing read).
        items = [replace(it, image_version=self._versions.pop(it.product_id, it.image_version)) for it in items]
        ok_items, arrays, colours, failures = [], [], [], []
        transient = 0
        fetch_s = decode_s = 0.0
        for item, (dec, exc, fs, ds) in zip(items, results, strict=True):
            fetch_s += fs
            decode_s += ds
            if exc is None:
                ok_items.append(item)
                arrays.append(dec.array)
                colours.append(dec.colours)
            else:
                transient += isinstance(exc, TransientStorageError)
                message = str(exc) if isinstance(exc, StorageError | BadImage) else f"{exc.__class__.__name__}: {exc}"
                failures.append(ProductFailure(item.product_id, item.image_version, failure_reason(exc), message[:500]))
        if items and transient == len(items):
            # The store is down, not the images: let the task retry with backoff.
            raise TransientStorageError(f"all {transient} images of the batch unreachable: {failures[0].error}")
        return Prepared(ok_items, arrays, failures, transient, fetch_s, decode_s, time.perf_counter() - t0, colours)

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
        coarse_ids, fine_ids, colour_ids = self.labels.coarse_ids, self.labels.fine_ids, self.colour_ids
        colours = prepared.colours or [None] * len(preds)
        tagged = []
        for item, pred, found in zip(prepared.items, preds, colours, strict=True):
            tags = [Tag(coarse_ids[i], float(s), i == pred.primary_coarse) for i, s in pred.coarse_tags]
            tags += [Tag(fine_ids[i], float(s), i == pred.primary_fine) for i, s in pred.fine_tags]
            if colour_ids and found:
                # score: the colour's share of the garment's pixels; primary: the largest
                named = [(colour_ids[n], share) for n, share in found if n in colour_ids]
                tags += [Tag(lid, share, k == 0) for k, (lid, share) in enumerate(named)]
            confidence, reason = self.review(pred)
            tagged.append(ProductTags(item.product_id, item.image_version, tags, confidence, reason))
        return tagged, time.perf_counter() - t0

    def review(self, pred) -> tuple[float, str | None]:
        """(confidence, review reason or None) of one prediction: the predictor's own garment score where
        it gives one (``review_score``), else the primary fine score (the best consistent pair's
        probability, ``model.calibration.review_scores`` "msp")."""
        score = getattr(pred, "review_score", None)
        confidence = float(score if score is not None else pred.fine_scores[pred.primary_fine])
        if getattr(pred, "out_of_distribution", False) or (
                self.ood_threshold is not None and confidence < self.ood_threshold):
            return confidence, "out_of_distribution"
        if self.review_threshold is not None and confidence < self.review_threshold:
            return confidence, "low_confidence"
        return confidence, None

    def write(self, run_id: int | None, prepared: Prepared, tagged: list[ProductTags], model_s: float) -> BatchReport:
        t0 = time.perf_counter()
        try:
            with session_scope(self.settings.database_url) as session:
                if self.shadow:
                    from catalog.shadow import write_shadow_batch

                    outcome = write_shadow_batch(session, run_id=run_id, model_version=self.model_version,
                                                 tagged=tagged, failed=prepared.failures)
                else:
                    outcome = write_batch(session, run_id=run_id, model_version=self.model_version, tagged=tagged,
                                          failed=prepared.failures)
                if run_id is not None:
                    finish_if_complete(session, run_id)
        except StaleWrite as exc:  # rolled back: the run was superseded or finished while this batch was written
            outcome = WriteOutcome(stale=exc.products)
        write_s = time.perf_counter() - t0
        stale_ids = sorted({i.product_id for i in prepared.items} | {f.product_id for f in prepared.failures}) \
            if outcome.stale else []
        return BatchReport(
            size=len(prepared.items) + len(prepared.failures),
            tagged=outcome.tagged,
            failed=outcome.failed,
            seconds={"fetch": prepared.fetch_s, "decode": prepared.decode_s, "model": model_s, "write": write_s},
            failures=prepared.failures if not outcome.stale else [],
            review=outcome.review,
            skipped=outcome.skipped,
            stale=outcome.stale,
            stale_ids=stale_ids,
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
