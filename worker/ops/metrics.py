"""Prometheus metrics (prometheus-client): per worker process, and for the whole deployment.

Worker processes: each Celery pool child serves its own endpoint on ``STYLETAG_METRICS_PORT`` (the
launcher gives each process its own port: ``--metrics-port 9109`` → uploads 9109, bulk 9110, and with
``--bulk-procs N`` the bulk pool processes 9110 ... 9110+N-1) on
``STYLETAG_METRICS_ADDR`` (default all interfaces, as a container needs):

* ``styletag_products_tagged_total``, ``styletag_products_failed_total{reason}``
* ``styletag_stage_seconds{stage=fetch|decode|model|write|wall}`` (histogram, per batch)
* ``styletag_batch_size`` (histogram), ``styletag_images_per_second`` (last batch)
* ``styletag_model_info{model_version, backbone, gpu, queue} 1`` (``gpu="none"`` on a CPU worker)

``styletag metrics --port 9108`` (the deployment exporter) reads at scrape time:

* ``styletag_queue_depth{queue}`` messages waiting per queue, ``styletag_unacked_messages``
* ``styletag_run_products{run_id, kind, counter=total|done|failed}`` and
  ``styletag_run_age_seconds{run_id, kind}`` of every unfinished run (a nightly run still going when
  the next is due shows here)
* ``styletag_broker_up`` / ``styletag_database_up`` (a scrape never fails because one is away)
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("styletag.metrics")

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
QUEUES = ("uploads", "bulk")

PRODUCTS_TAGGED = Counter("styletag_products_tagged", "Products tagged by this process")
PRODUCTS_FAILED = Counter("styletag_products_failed", "Products recorded as failed, by reason", ["reason"])
STAGE_SECONDS = Histogram("styletag_stage_seconds", "Seconds per batch spent in each stage", ["stage"],
                          buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("styletag_batch_size", "Products per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
IMAGES_PER_SECOND = Gauge("styletag_images_per_second", "Throughput of the last batch (images/s)")
MODEL_INFO = Gauge("styletag_model_info", "The model this process serves and the GPU it is pinned to",
                   ["model_version", "backbone", "gpu", "queue"])

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
        start_http_server(port, addr=settings.metrics_addr)
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
        STAGE_SECONDS.labels(stage).observe(seconds)
    BATCH_SIZE.observe(report.size)
    wall = report.seconds.get("wall") or sum(report.seconds.values())
    if wall > 0:
        IMAGES_PER_SECOND.set(report.size / wall)


def queue_depths(settings, queues=QUEUES, timeout: float = 2.0) -> tuple[dict[str, int], int | None]:
    """Messages waiting per queue (every priority level counted) and, on Redis, messages delivered but
    not yet acknowledged, on ``settings``' broker. Through ``worker.app.broker_connection``, so Sentinel
    URLs work too."""
    from kombu.exceptions import ChannelError

    from worker.app import broker_connection

    depths: dict[str, int] = {}
    with broker_connection(settings, read=True, connect_timeout=timeout) as conn:
        channel = conn.default_channel
        for q in queues:
            try:
                depths[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
            except ChannelError:  # the queue's key does not exist: nothing waiting
                depths[q] = 0
        unacked = None
        client, key = getattr(channel, "client", None), getattr(channel, "unacked_key", None)
        if client is not None and key:
            unacked = int(client.hlen(key))
    return depths, unacked


class DeploymentCollector:
    """Queue depth per queue and counters of unfinished runs, read at scrape time."""

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("styletag_queue_depth", "Messages waiting per queue", labels=["queue"])
        unacked = GaugeMetricFamily("styletag_unacked_messages", "Messages delivered to workers, not yet acked")
        broker_up = GaugeMetricFamily("styletag_broker_up", "1 when the broker answered this scrape")
        try:
            depths, n_unacked = queue_depths(self.settings)
            for q, n in depths.items():
                depth.add_metric([q], n)
            if n_unacked is not None:
                unacked.add_metric([], n_unacked)
            broker_up.add_metric([], 1)
        except Exception as exc:  # a scrape must not fail because Redis is away
            log.warning("queue depth unavailable: %s", str(exc).splitlines()[0][:120] if str(exc) else exc)
            broker_up.add_metric([], 0)
        yield depth
        yield unacked
        yield broker_up

        runs = GaugeMetricFamily("styletag_run_products", "Counters of unfinished runs",
                                 labels=["run_id", "kind", "counter"])
        ages = GaugeMetricFamily("styletag_run_age_seconds", "Seconds since an unfinished run started",
                                 labels=["run_id", "kind"])
        db_up = GaugeMetricFamily("styletag_database_up", "1 when the database answered this scrape")
        try:
            from catalog.db import session_scope
            from catalog.runs import run_age_seconds, unfinished_runs

            with session_scope(self.settings.database_url) as s:
                for r in unfinished_runs(s):
                    for name in ("total", "done", "failed"):
                        runs.add_metric([str(r.id), r.kind, name], getattr(r, name))
                    ages.add_metric([str(r.id), r.kind], run_age_seconds(r))
            db_up.add_metric([], 1)
        except Exception as exc:
            log.warning("run counters unavailable: %s", str(exc).splitlines()[0][:120] if str(exc) else exc)
            db_up.add_metric([], 0)
        yield runs
        yield ages
        yield db_up


def serve_exporter(port: int, settings) -> None:
    from prometheus_client import REGISTRY

    REGISTRY.register(DeploymentCollector(settings))
    start_http_server(port, addr=settings.metrics_addr)
    log.info("metrics exporter on %s:%d", settings.metrics_addr, port)
    while True:
        time.sleep(3600)
