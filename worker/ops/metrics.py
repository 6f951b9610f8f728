"""Prometheus metrics (prometheus-client): per worker process, and for the whole deployment.

Worker processes: each Celery pool child serves its own endpoint on ``STYLETAG_METRICS_PORT`` (the
launcher gives each process its own port: ``--metrics-port 9109`` → uploads 9109, bulk 9110, and with
``--bulk-procs N`` the bulk pool processes 9110 ... 9110+N-1) on
``STYLETAG_METRICS_ADDR`` (default all interfaces, as a container needs), from a registry of its own
(:data:`WORKER_REGISTRY`: these metrics and the process's own ``process_*`` / ``python_*``):

* ``styletag_products_tagged_total``, ``styletag_products_failed_total{reason}``
* ``styletag_images_total``: images through the pipeline (tagged or failed); ``rate()`` of it is the
  throughput, ``rate(styletag_images_total) / rate(styletag_batch_seconds_sum)`` the throughput while busy
* ``styletag_stage_seconds{stage=fetch|decode|model|write}`` (histogram, per batch; the stages overlap,
  so their sum is not the batch's time), ``styletag_batch_seconds`` (histogram, batch to batch)
* ``styletag_batch_size`` (histogram)
* ``styletag_upload_latency_seconds`` (histogram, uploads worker): from ``styletag enqueue`` (the
  message's ``enqueued_at``) to the upload's tags committed: what an operator watches
* ``styletag_model_info{model_version, backbone, gpu, queue} 1`` (``gpu="none"`` on a CPU worker)

``styletag metrics --port 9108`` (the deployment exporter) serves only these, read at scrape time:

* ``styletag_queue_depth{queue}`` messages waiting per queue, ``styletag_unacked_messages``
* ``styletag_messages_dead_lettered_total{queue, reason}``: malformed broker items a worker dropped
  (``worker/messages.py``; kept in the Redis list ``styletag:dead-letter``), ``styletag_dead_letter_messages``
  (the list's length)
* ``styletag_run_products{run_id, kind}`` (the run's total), ``styletag_run_done_products``,
  ``styletag_run_failed_products`` and ``styletag_run_age_seconds`` of every unfinished run (a nightly run
  still going when the next is due shows here)
* ``styletag_broker_up`` / ``styletag_database_up`` (a scrape never fails because one is away)

No ``*_created`` series: they double every counter and histogram and nothing here reads them.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("styletag.metrics")

disable_created_metrics()

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# An upload is tagged within the flush interval plus one batch: tens of milliseconds to seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
QUEUES = ("uploads", "bulk")
STAGES = ("fetch", "decode", "model", "write")

WORKER_REGISTRY = CollectorRegistry()
ProcessCollector(registry=WORKER_REGISTRY)
PlatformCollector(registry=WORKER_REGISTRY)
GCCollector(registry=WORKER_REGISTRY)

PRODUCTS_TAGGED = Counter("styletag_products_tagged", "Products tagged by this process", registry=WORKER_REGISTRY)
PRODUCTS_FAILED = Counter("styletag_products_failed", "Products recorded as failed, by reason", ["reason"],
                          registry=WORKER_REGISTRY)
IMAGES = Counter("styletag_images", "Images through the pipeline (tagged or failed); rate() is the throughput",
                 registry=WORKER_REGISTRY)
STAGE_SECONDS = Histogram("styletag_stage_seconds", "Seconds per batch spent in each stage", ["stage"],
                          buckets=STAGE_BUCKETS, registry=WORKER_REGISTRY)
BATCH_SECONDS = Histogram("styletag_batch_seconds", "Seconds from one batch to the next (wall time)",
                          buckets=STAGE_BUCKETS, registry=WORKER_REGISTRY)
BATCH_SIZE = Histogram("styletag_batch_size", "Products per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                       registry=WORKER_REGISTRY)
UPLOAD_LATENCY = Histogram("styletag_upload_latency_seconds", "Seconds from enqueue to the upload's tags committed",
                           buckets=LATENCY_BUCKETS, registry=WORKER_REGISTRY)
MODEL_INFO = Gauge("styletag_model_info", "The model this process serves and the GPU it is pinned to",
                   ["model_version", "backbone", "gpu", "queue"], registry=WORKER_REGISTRY)

_started = False


def _pool_index() -> int:
    """0 for the first (or only) Celery pool process, 1 for the second, ... (billiard's index)."""
    from celery.utils.log import current_process_index

    return current_process_index(base=0) or 0


def start_worker_metrics(settings, model_version: str, backbone: str) -> int | None:
    """Serve this process's metrics when STYLETAG_METRICS_PORT is set; returns the port."""
    global _started
    MODEL_INFO.labels(model_version, backbone, settings.gpu, settings.queue).set(1)
    port = settings.metrics_port
    if port:
        port += _pool_index()  # a bulk worker with several pool processes: one port each
    if port and not _started:
        start_http_server(port, addr=settings.metrics_addr, registry=WORKER_REGISTRY)
        _started = True
        log.info("metrics on port %d", port)
        return port
    return None


def observe_batch(report) -> None:
    """Record one pipeline batch (a ``worker.pipeline.BatchReport``), after its write committed."""
    PRODUCTS_TAGGED.inc(report.tagged)
    for failure in report.failures:
        PRODUCTS_FAILED.labels(failure.reason).inc()
    for stage, seconds in report.seconds.items():
        if stage in STAGES:
            STAGE_SECONDS.labels(stage).observe(seconds)
    if "wall" in report.seconds:
        BATCH_SECONDS.observe(report.seconds["wall"])
    BATCH_SIZE.observe(report.size)
    IMAGES.inc(report.size)


def observe_upload_latency(enqueued_at: list[float], now: float | None = None) -> None:
    """Uploads whose tags just committed: seconds since each was enqueued (``time.time()`` of the
    producer; a clock behind the worker's gives 0, never a negative figure)."""
    now = time.time() if now is None else now
    for t in enqueued_at:
        UPLOAD_LATENCY.observe(max(0.0, now - t))


def queue_depths(settings, queues=QUEUES, timeout: float = 2.0) -> tuple[dict[str, int], int | None]:
    """Messages waiting per queue (every priority level counted) and, on Redis, messages delivered but
    not yet acknowledged, on ``settings``' broker. Through ``worker.app.broker_connection``, so Sentinel
    URLs work too."""
    state = broker_state(settings, queues, timeout)
    return state["depths"], state["unacked"]


def broker_state(settings, queues=QUEUES, timeout: float = 2.0) -> dict:
    """What the exporter reads from the broker in one connection: ``depths`` per queue, ``unacked``, and
    the dead-letter ``dead_counts`` ((queue, reason) -> n) and ``dead_kept`` (list length)."""
    from kombu.exceptions import ChannelError

    from worker.app import broker_connection
    from worker.messages import DEAD_LETTER_KEY, dead_letter_counts

    depths: dict[str, int] = {}
    state: dict = {"depths": depths, "unacked": None, "dead_counts": {}, "dead_kept": None}
    with broker_connection(settings, read=True, connect_timeout=timeout) as conn:
        channel = conn.default_channel
        for q in queues:
            try:
                depths[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
            except ChannelError:  # the queue's key does not exist: nothing waiting
                depths[q] = 0
        client, key = getattr(channel, "client", None), getattr(channel, "unacked_key", None)
        if client is not None and key:
            state["unacked"] = int(client.hlen(key))
            state["dead_counts"] = dead_letter_counts(client)
            state["dead_kept"] = int(client.llen(DEAD_LETTER_KEY))
    return state


class DeploymentCollector:
    """Queue depth per queue and counters of unfinished runs, read at scrape time."""

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        depth = GaugeMetricFamily("styletag_queue_depth", "Messages waiting per queue", labels=["queue"])
        unacked = GaugeMetricFamily("styletag_unacked_messages", "Messages delivered to workers, not yet acked")
        broker_up = GaugeMetricFamily("styletag_broker_up", "1 when the broker answered this scrape")
        dead = CounterMetricFamily("styletag_messages_dead_lettered", "Malformed broker items dropped by workers "
                                   "(kept in the Redis list styletag:dead-letter)", labels=["queue", "reason"])
        dead_kept = GaugeMetricFamily("styletag_dead_letter_messages", "Items in the Redis list styletag:dead-letter")
        try:
            state = broker_state(self.settings)
            for q, n in state["depths"].items():
                depth.add_metric([q], n)
            if state["unacked"] is not None:
                unacked.add_metric([], state["unacked"])
                dead_kept.add_metric([], state["dead_kept"])
            for (q, reason), n in sorted(state["dead_counts"].items()):
                dead.add_metric([q, reason], n)
            broker_up.add_metric([], 1)
        except Exception as exc:  # a scrape must not fail because Redis is away
            log.warning("queue depth unavailable: %s", str(exc).splitlines()[0][:120] if str(exc) else exc)
            broker_up.add_metric([], 0)
        yield depth
        yield unacked
        yield dead
        yield dead_kept
        yield broker_up

        runs = {name: GaugeMetricFamily(metric, help_, labels=["run_id", "kind"]) for name, metric, help_ in (
            ("total", "styletag_run_products", "Products an unfinished run is to tag (its total)"),
            ("done", "styletag_run_done_products", "Products an unfinished run has tagged"),
            ("failed", "styletag_run_failed_products", "Products an unfinished run recorded as failed"))}
        ages = GaugeMetricFamily("styletag_run_age_seconds", "Seconds since an unfinished run started",
                                 labels=["run_id", "kind"])
        db_up = GaugeMetricFamily("styletag_database_up", "1 when the database answered this scrape")
        review = GaugeMetricFamily("styletag_review_queue", "Products held for review (hidden from the storefront)")
        try:
            from catalog.db import session_scope
            from catalog.review import queue_size
            from catalog.runs import run_age_seconds, unfinished_runs

            with session_scope(self.settings.database_url) as s:
                review.add_metric([], queue_size(s))
                for r in unfinished_runs(s):
                    for name, family in runs.items():
                        family.add_metric([str(r.id), r.kind], getattr(r, name))
                    ages.add_metric([str(r.id), r.kind], run_age_seconds(r))
            db_up.add_metric([], 1)
        except Exception as exc:
            log.warning("run counters unavailable: %s", str(exc).splitlines()[0][:120] if str(exc) else exc)
            db_up.add_metric([], 0)
        yield from runs.values()
        yield ages
        yield review
        yield db_up


def exporter_registry(settings) -> CollectorRegistry:
    """The exporter's registry: deployment metrics only (no worker metric at zero beside them)."""
    registry = CollectorRegistry()
    registry.register(DeploymentCollector(settings))
    return registry


def serve_exporter(port: int, settings) -> None:
    start_http_server(port, addr=settings.metrics_addr, registry=exporter_registry(settings))
    log.info("metrics exporter on %s:%d", settings.metrics_addr, port)
    while True:
        time.sleep(3600)
