"""Prometheus metrics of a worker process (prometheus-client), and the queue-depth/run exporter.

Each worker pool child serves its own endpoint on ``STYLETAG_METRICS_PORT`` (the launcher gives each
process its own port). ``styletag metrics`` serves queue depth per queue and run counters for the
whole deployment from Redis and the database.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("styletag.metrics")

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

PRODUCTS_TAGGED = Counter("styletag_products_tagged", "Products tagged by this process")
PRODUCTS_FAILED = Counter("styletag_products_failed", "Products recorded as failed, by reason", ["reason"])
STAGE_SECONDS = Histogram("styletag_stage_seconds", "Seconds per batch spent in each stage", ["stage"],
                          buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("styletag_batch_size", "Products per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
IMAGES_PER_SECOND = Gauge("styletag_images_per_second", "Throughput of the last batch (images/s)")
MODEL_INFO = Gauge("styletag_model_info", "The model this process serves and the GPU it is pinned to",
                   ["model_version", "backbone", "gpu", "queue"])

_started = False


def start_worker_metrics(model_version: str, backbone: str) -> int | None:
    """Serve this process's metrics when STYLETAG_METRICS_PORT is set; returns the port."""
    global _started
    MODEL_INFO.labels(model_version, backbone, os.environ.get("STYLETAG_GPU", "none"),
                      os.environ.get("STYLETAG_QUEUE", "inline")).set(1)
    port = int(os.environ.get("STYLETAG_METRICS_PORT", "0") or 0)
    if port and not _started:
        start_http_server(port, addr=os.environ.get("STYLETAG_METRICS_ADDR", "0.0.0.0"))  # noqa: S104
        _started = True
        log.info("metrics on port %d", port)
        return port
    return None


def observe_batch(report) -> None:
    """Record one pipeline batch (a ``worker.pipeline.BatchReport``)."""
    PRODUCTS_TAGGED.inc(report.tagged)
    for failure in report.failures:
        PRODUCTS_FAILED.labels(failure.reason).inc()
    for stage, seconds in report.seconds.items():
        STAGE_SECONDS.labels(stage).observe(seconds)
    BATCH_SIZE.observe(report.size)
    wall = report.seconds.get("wall") or sum(report.seconds.values())
    if wall > 0:
        IMAGES_PER_SECOND.set(report.size / wall)


class DeploymentCollector:
    """Queue depth per queue (Redis LLEN) and counters of unfinished runs, read at scrape time."""

    def __init__(self, broker_url: str, database_url: str):
        self.broker_url = broker_url
        self.database_url = database_url

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("styletag_queue_depth", "Messages waiting per queue", labels=["queue"])
        try:
            import redis

            client = redis.Redis.from_url(self.broker_url, socket_timeout=2)
            for q in ("uploads", "bulk"):
                depth.add_metric([q], client.llen(q))
        except Exception as exc:  # a scrape must not fail because Redis is away
            log.warning("queue depth unavailable: %s", str(exc).splitlines()[0][:120])
        yield depth
        runs = GaugeMetricFamily("styletag_run_products", "Counters of unfinished runs", labels=["run_id", "counter"])
        try:
            from sqlalchemy import select

            from catalog.db import session_scope
            from catalog.schema import TaggingRun

            with session_scope(self.database_url) as s:
                for r in s.scalars(select(TaggingRun).where(TaggingRun.status.in_(("enqueuing", "running")))):
                    for name in ("total", "done", "failed"):
                        runs.add_metric([str(r.id), name], getattr(r, name))
        except Exception as exc:
            log.warning("run counters unavailable: %s", str(exc).splitlines()[0][:120])
        yield runs


def serve_exporter(port: int, broker_url: str, database_url: str) -> None:
    import time

    from prometheus_client import REGISTRY

    REGISTRY.register(DeploymentCollector(broker_url, database_url))
    start_http_server(port)
    log.info("exporter on port %d", port)
    while True:
        time.sleep(3600)
