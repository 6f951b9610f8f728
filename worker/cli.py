"""The ``styletag`` command. Sub-commands load lazily, so ``styletag tags`` never imports torch.

Every user error is one line on stderr (``error: ...``) and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys

import click

from catalog.errors import StyletagError

COMMANDS = {
    "db": "catalog.cli:db",
    "import": "catalog.cli:import_cmd",
    "tags": "catalog.cli:tags",
    "find": "catalog.cli:find",
    "facets": "catalog.cli:facets",
    "train": "model.cli:train",
    "eval": "model.cli:eval_cmd",
    "worker": "worker.cli:worker_cmd",
    "retag": "worker.cli:retag_cmd",
    "runs": "worker.cli:runs_cmd",
    "enqueue": "worker.cli:enqueue_cmd",
    "beat": "worker.cli:beat_cmd",
    "metrics": "worker.cli:metrics_cmd",
    "report": "worker.ops.report:report_cmd",
}


class LazyGroup(click.Group):
    """Sub-commands imported on first use; every error a sub-command raises becomes a :class:`UserError`
    (also under click's test runner, which calls the group, not :func:`main`)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt, BrokenPipeError):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
            raise user_error(exc) from None

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", show_default=True, help="Python log level.")
@click.option("--log-json", is_flag=True, help="Log as JSON lines.")
def cli(log_level: str, log_json: bool) -> None:
    """styletag: tag a product catalog with hierarchical style labels."""
    from worker.ops.logs import configure_logging

    configure_logging(log_level, json_lines=log_json)


def _settings():
    from catalog.settings import Settings

    return Settings.from_env()


@click.command("worker")
@click.option("--gpus", default="auto", show_default=True, help="all | none | comma-separated GPU ids.")
@click.option("--queues", default="uploads,bulk", show_default=True, help="Queues to serve.")
@click.option("--threads", type=int, default=None, help="torch threads per worker (CPU inference).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=int, default=0, help="First Prometheus port (one per worker process).")
@click.option("--bulk-procs", type=int, default=1, show_default=True,
              help="Bulk pool processes per GPU (each loads the model; use spare cores, see docs/operations.md).")
@click.option("--dry-run", is_flag=True, help="Print the worker processes that would start, as JSON.")
def worker_cmd(gpus, queues, threads, loglevel, metrics_port, bulk_procs, dry_run) -> None:
    """Start one Celery worker per GPU and queue group, each pinned with CUDA_VISIBLE_DEVICES."""
    from worker.ops.launcher import build_specs, parse_gpus, parse_queues, run_workers

    specs = build_specs(parse_gpus(gpus), parse_queues(queues), threads=threads, loglevel=loglevel,
                        metrics_port=metrics_port, bulk_procs=bulk_procs)
    if dry_run:
        click.echo(json.dumps([{"node": s.nodename, "gpu": s.gpu, "queue": s.queue,
                                "CUDA_VISIBLE_DEVICES": s.env["CUDA_VISIBLE_DEVICES"], "argv": list(s.argv)}
                               for s in specs], indent=2))
        return
    sys.exit(run_workers(specs))


@click.command("retag")
@click.option("--all", "scope", flag_value="all", help="Retag every product.")
@click.option("--changed-only", "scope", flag_value="changed", default=True,
              help="Only products whose model or image version changed (default).")
@click.option("--wait", is_flag=True, help="Follow the run's progress until it finishes.")
@click.option("--inline", is_flag=True, help="Run the pipeline in this process (no broker).")
@click.option("--resume", "resume", type=int, default=None, metavar="RUN_ID",
              help="Re-enqueue what run RUN_ID has not finished.")
@click.option("--kind", type=click.Choice(["manual", "nightly"]), default="manual", show_default=True)
@click.option("--chunk", type=int, default=1024, show_default=True, help="Product ids per bulk task.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON at the end.")
def retag_cmd(scope, wait, inline, resume, kind, chunk, timeout, as_json) -> None:
    """Tag the catalog: create a run, enqueue its products (or tag them inline)."""
    from catalog.db import session_scope
    from catalog.runs import get_run, run_as_dict
    from worker.producers.retag import enqueue_run, run_inline, start_run, wait_for_run

    settings = _settings()
    enqueued = False  # a nightly run not tagged inline comes back enqueued already
    if kind == "nightly" and resume is None:
        # The same guard as beat's: never two nightly runs at once (Redis lock + database claim).
        run_id = _start_nightly_from_cli(settings, scope, inline, chunk, as_json)
        enqueued = not inline
    else:
        run_id = resume if resume is not None else start_run(settings, scope=scope, kind=kind)
    if resume is not None:
        with session_scope(settings.database_url) as session:
            get_run(session, resume)
    try:
        if inline:
            report = run_inline(settings, run_id, resume=resume is not None, progress=True)
            rate = report.products / report.wall_s if report.wall_s else 0.0
            click.echo(f"run {run_id}: {report.tagged} tagged, {report.failed} failed in {report.wall_s:.1f}s "
                       f"({rate:.0f} images/s)", err=as_json)
        elif not enqueued:
            sent = enqueue_run(settings, run_id, resume=resume is not None, chunk=chunk, progress=False)
            click.echo(f"run {run_id}: enqueued {sent} products", err=as_json)
    except BaseException:
        if resume is None:  # never leave a run stuck in 'enqueuing'; 'retag --resume' can still finish it
            from catalog.runs import cancel_run

            with session_scope(settings.database_url) as session:
                cancel_run(session, run_id)
        raise
    if wait and not inline:
        wait_for_run(settings, run_id, progress=True, timeout=timeout)
    with session_scope(settings.database_url) as session:
        info = run_as_dict(get_run(session, run_id))
    if as_json:
        click.echo(json.dumps(info))
    elif wait or inline:
        click.echo(_run_line(info))


def _start_nightly_from_cli(settings, scope: str, inline: bool, chunk: int, as_json: bool) -> int:
    """``retag --kind nightly``: through beat's guard, so a manual nightly never doubles a running one.
    Returns the new run's id (enqueued already unless ``inline``); a nightly still going is an error."""
    from catalog.errors import StyletagError
    from worker.producers.nightly import claim_nightly, start_nightly
    from worker.producers.retag import current_model_version

    if scope != "changed":
        raise StyletagError("a nightly run is --changed-only; use --kind manual with --all")
    if inline:
        claim = claim_nightly(settings, current_model_version(settings))
        busy = claim.get("busy")
    else:
        out = start_nightly(settings, chunk=chunk, report_skip=False)
        if out["started"]:
            click.echo(f"run {out['run_id']}: enqueued {out['enqueued']} products", err=as_json)
            return int(out["run_id"])
        if out["reason"] == "locked":
            raise StyletagError("another nightly run is being started right now; not starting one")
        busy = out["run"]
    if busy is not None:
        raise StyletagError(f"nightly run {busy['id']} is still {busy['status']} ({busy['done']} done, "
                            f"{busy['failed']} failed of {busy['total']}); not starting another "
                            f"('styletag retag --resume {busy['id']}' re-enqueues what it has not done)")
    return int(claim["created"])


def _run_line(info: dict) -> str:
    return (f"run {info['id']:>5}  {info['kind']:<8} {info['scope']:<8} {info['status']:<9} "
            f"done {info['done']:>8} failed {info['failed']:>6} total {info['total']:>8}  "
            f"model {info['model_version'][:16]}  started {info['created_at']}")


@click.command("runs")
@click.argument("run_id", type=int, required=False)
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs_cmd(run_id, limit, as_json) -> None:
    """Show tagging runs and their counters."""
    from catalog.db import session_scope
    from catalog.runs import get_run, list_runs, run_as_dict

    settings = _settings()
    with session_scope(settings.database_url) as session:
        runs = [run_as_dict(get_run(session, run_id))] if run_id else [run_as_dict(r) for r in list_runs(session, limit)]
    if as_json:
        click.echo(json.dumps(runs[0] if run_id else runs, default=str))
        return
    for info in runs:
        click.echo(_run_line(info))


@click.command("enqueue")
@click.argument("skus", nargs=-1, required=True)
def enqueue_cmd(skus) -> None:
    """Enqueue products (new uploads) by SKU onto the uploads queue."""
    from worker.producers.uploads import enqueue_uploads

    ids = enqueue_uploads(list(skus), _settings())
    click.echo(f"enqueued {len(ids)} products on the uploads queue")


@click.command("beat")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--schedule-file", default=None, help="Where beat keeps its state (default: $STYLETAG_HOME).")
def beat_cmd(loglevel, schedule_file) -> None:
    """Run Celery beat: the nightly 'retag --changed-only' at STYLETAG_NIGHTLY_CRON."""
    from worker.app import app
    from worker.ops.beat import configure_beat

    settings = _settings()
    configure_beat(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    path = schedule_file or str(settings.home / "celerybeat-schedule")
    app.Beat(loglevel=loglevel, schedule=path).run()


@click.command("metrics")
@click.option("--port", type=int, default=9108, show_default=True)
def metrics_cmd(port) -> None:
    """Serve deployment metrics (queue depth per queue, counters of unfinished runs) for Prometheus."""
    from worker.ops.metrics import serve_exporter

    serve_exporter(port, _settings())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


class UserError(click.ClickException):
    """What the user sees of any failure: ``error: <one line>`` on stderr, secrets masked, and the exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(" ".join(str(message).split()) or "unknown error")  # one line, whatever it held
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        from worker.ops.logs import scrub

        try:
            click.echo(f"error: {scrub(self.message)}", err=True)
        except Exception:  # noqa: BLE001, S110 - stderr gone (closed pipe): the exit code still says it
            pass


def _setting(name: str) -> str:
    """A URL setting for an error message, password masked; never raises (we are already failing)."""
    from catalog.settings import Settings, redact_url

    try:
        return redact_url(getattr(Settings.from_env(), name))
    except Exception:  # noqa: BLE001 - a malformed setting must not hide the error being reported
        return f"(see STYLETAG_{name.upper()})"


def _database_error(exc: BaseException) -> str:
    from sqlalchemy.exc import InterfaceError, OperationalError

    url = _setting("database_url")
    detail = _one_line(getattr(exc, "orig", None) or exc)
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"database {url} is not migrated ({detail}); run 'styletag db upgrade'"
    if isinstance(exc, OperationalError | InterfaceError):
        return f"database {url} unavailable ({detail}); check STYLETAG_DATABASE_URL and that the server is up"
    return f"database {url} refused the operation ({detail}); check STYLETAG_DATABASE_URL and its privileges"


def _is_broker_error(exc: BaseException) -> bool:
    """kombu / redis-py connection errors (checked without importing them: if they are not loaded,
    the error cannot be theirs)."""
    kinds = []
    for module, attr in (("kombu.exceptions", "OperationalError"), ("redis.exceptions", "ConnectionError"),
                         ("redis.exceptions", "AuthenticationError"), ("redis.exceptions", "TimeoutError")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            kinds.append(getattr(mod, attr))
    return bool(kinds) and isinstance(exc, tuple(kinds))


def user_error(exc: Exception) -> click.ClickException:
    """Map any failure to what the user sees, by type: a StyletagError says its own line; database and
    broker errors name the setting to check; anything else is 'unexpected' (details with DEBUG logging)."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, click.ClickException):
        return exc
    if isinstance(exc, StyletagError):
        return UserError(exc.message, exc.exit_code)
    logging.getLogger("styletag").debug("error", exc_info=exc)
    if isinstance(exc, DBAPIError):
        return UserError(_database_error(exc))
    if _is_broker_error(exc):
        return UserError(f"broker {_setting('broker_url')} unreachable ({_one_line(exc)}); check STYLETAG_BROKER_URL")
    return UserError(f"unexpected {exc.__class__.__name__}: {_one_line(exc)} (run with --log-level DEBUG for details)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure is one line on stderr (``error: ...``, secrets masked) and a non-zero
    exit code; a traceback only with ``--log-level DEBUG``, through the scrubbed log."""
    try:
        cli.main(args=argv, prog_name="styletag", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors show click's own text; ours "error: ..."
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        UserError("aborted").show()
        sys.exit(130)
    except BrokenPipeError:  # stdout piped into head: nothing left to say, and no flush error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - raised outside a command (option parsing callbacks)
        err = user_error(exc)
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
