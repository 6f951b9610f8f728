"""``styletag worker``, ``beat`` and ``metrics``: the long-running services."""

from __future__ import annotations

import json
import sys

import click

from catalog.settings import Settings


def _settings() -> Settings:
    return Settings.from_env()


@click.command("worker")
@click.option("--gpus", default="auto", show_default=True, help="all | none | comma-separated GPU ids.")
@click.option("--queues", default="uploads,bulk", show_default=True, help="Queues to serve.")
@click.option("--threads", type=int, default=None, help="torch threads per worker (CPU inference).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=int, default=0, help="First Prometheus port (one per worker process).")
@click.option("--bulk-procs", type=int, default=None,
              help="Bulk pool processes per GPU (each loads the model; use spare cores, see docs/operations.md). "
                   "Default: 1 per GPU; on a host without GPUs, one per core (at most 8).")
@click.option("--dry-run", is_flag=True, help="Print the worker processes that would start, as JSON.")
@click.option("--health", is_flag=True,
              help="Exit 0 when every Celery node these options start answers a ping (a health check).")
def worker_cmd(gpus, queues, threads, loglevel, metrics_port, bulk_procs, dry_run, health) -> None:
    """Start one Celery worker per GPU and queue group, each pinned with CUDA_VISIBLE_DEVICES."""
    from worker.ops.launcher import build_specs, parse_gpus, parse_queues, run_workers

    specs = build_specs(parse_gpus(gpus), parse_queues(queues), threads=threads, loglevel=loglevel,
                        metrics_port=metrics_port, bulk_procs=bulk_procs)
    if dry_run:
        click.echo(json.dumps([{"node": s.nodename, "gpu": s.gpu, "queue": s.queue,
                                "CUDA_VISIBLE_DEVICES": s.env["CUDA_VISIBLE_DEVICES"], "argv": list(s.argv)}
                               for s in specs], indent=2))
        return
    if health:
        from catalog.errors import ServiceUnavailable
        from worker.ops.launcher import ping_nodes

        if missing := ping_nodes(_settings(), [s.nodename for s in specs]):
            raise ServiceUnavailable(f"no answer from {', '.join(missing)} (a Celery process that died or is "
                                     "restarting; see the worker's log)")
        click.echo(f"ok: {', '.join(s.nodename for s in specs)}")
        return
    _before_start(_settings())
    sys.exit(run_workers(specs))


def _before_start(settings: Settings) -> None:
    """A configuration error stops the launcher with one line before any worker starts (issue 15, item 6);
    bindings an older version left in the broker are removed (item 8)."""
    import logging

    from worker.ops.preflight import preflight

    preflight(settings)
    log = logging.getLogger("styletag.launcher")
    try:
        from worker.app import remove_stale_bindings

        if removed := remove_stale_bindings(settings):
            log.warning("removed %d stale queue binding(s) left by an older styletag", removed)
    except Exception as exc:  # noqa: BLE001 - the broker may come up later; Celery retries its connection
        log.warning("queue bindings not checked (broker unavailable: %s)", str(exc).splitlines()[0][:120])


@click.command("beat")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--schedule-file", default=None, help="Where beat keeps its state (default: $STYLETAG_HOME).")
@click.option("--health", is_flag=True, help="Exit 0 when beat's schedule file exists and the broker answers.")
def beat_cmd(loglevel, schedule_file, health) -> None:
    """Run Celery beat: the nightly 'retag --changed-only' at STYLETAG_NIGHTLY_CRON."""
    from worker.app import app
    from worker.ops.beat import configure_beat

    settings = _settings()
    path = schedule_file or str(settings.home / "celerybeat-schedule")
    if health:
        _beat_health(settings, path)
        return
    configure_beat(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    app.Beat(loglevel=loglevel, schedule=path).run()


def _beat_health(settings: Settings, path: str) -> None:
    from pathlib import Path

    from catalog.errors import ServiceUnavailable
    from worker.app import broker_connection

    schedule = Path(path)
    if not any(schedule.parent.glob(schedule.name + "*")):  # shelve may add .db / .dat
        raise ServiceUnavailable(f"beat has not started: no schedule file {path}")
    with broker_connection(settings, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=1)
    click.echo(f"ok: schedule {path}, broker answers")


@click.command("metrics")
@click.option("--port", type=int, default=9108, show_default=True)
def metrics_cmd(port) -> None:
    """Serve deployment metrics (queue depth per queue, counters of unfinished runs) for Prometheus."""
    from worker.ops.metrics import serve_exporter

    serve_exporter(port, _settings())
