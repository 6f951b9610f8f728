"""``styletag retag`` and ``runs``: start and follow tagging runs (``enqueue`` is in worker/cli/uploads.py)."""

from __future__ import annotations

import json

import click

from catalog.settings import Settings


def _settings() -> Settings:
    return Settings.from_env()


# A run id is a positive BIGINT; anything else is refused before a query (not an OverflowError in one).
RUN_ID = click.IntRange(1, 2**63 - 1)


def _warn_other_taxonomy(settings, run_id: int) -> None:
    """One line on standard error when the run's model serves a taxonomy the catalog has no labelled product
    of, while another taxonomy has some (a shop's catalog about to be tagged by the Fashion-MNIST bootstrap)."""
    from catalog.db import session_scope
    from catalog.labels import other_labelled_taxonomy
    from catalog.models import get_model
    from catalog.runs import run_model

    with session_scope(settings.database_url) as session:
        info = run_model(session, run_id)
        if info is None:
            return
        served = get_model(session, info[0]).taxonomy
        other = other_labelled_taxonomy(session, served)
    if other is not None:
        click.echo(f"warning: the catalog's labelled products are of taxonomy {other!r}, this run's model serves "
                   f"{served!r}: its tags will be {served!r} labels; train and activate a model of {other!r} "
                   f"('styletag train --from-catalog --taxonomy {other} --out M.safetensors', then 'styletag model "
                   "register M.safetensors --activate')", err=True)


@click.command("retag")
@click.option("--all", "scope", flag_value="all", help="Retag every product.")
@click.option("--changed-only", "scope", flag_value="changed", default=True,
              help="Only products whose model or image version changed (default).")
@click.option("--wait", is_flag=True, help="Follow the run's progress until it finishes.")
@click.option("--inline", is_flag=True, help="Run the pipeline in this process (no broker).")
@click.option("--resume", "resume", type=RUN_ID, default=None, metavar="RUN_ID",
              help="Re-enqueue what run RUN_ID has not finished.")
@click.option("--kind", type=click.Choice(["manual", "nightly"]), default="manual", show_default=True)
@click.option("--chunk", type=click.IntRange(1), default=1024, show_default=True,
              help="Product ids per bulk task (at most STYLETAG_MAX_IDS_PER_TASK).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=None,
              help="With --wait: give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON at the end.")
@click.option("--skip-image-check", is_flag=True,
              help="With --changed-only: trust the catalog's image versions (no HEAD of every image first).")
@click.option("--shadow", "shadow", default=None, metavar="VERSION",
              help="Write registered model VERSION's predictions to the shadow table only (for 'model compare').")
def retag_cmd(scope, wait, inline, resume, kind, chunk, timeout, as_json, skip_image_check, shadow) -> None:
    """Tag the catalog: create a run, enqueue its products (or tag them inline)."""
    from catalog.db import session_scope
    from catalog.runs import get_run, run_as_dict
    from worker.producers.retag import enqueue_run, run_inline, start_run, wait_for_run

    settings = _settings()
    if chunk > settings.max_ids_per_task:  # the workers would refuse every message
        raise click.BadParameter(f"{chunk} is over STYLETAG_MAX_IDS_PER_TASK ({settings.max_ids_per_task}), "
                                 "the most ids a worker accepts in one message", param_hint="'--chunk'")
    from worker.ops.preflight import preflight

    preflight(settings)  # a setting that would fail every product: one line now, no run created
    if scope == "changed" and resume is None and not skip_image_check and shadow is None and kind != "nightly":
        # A photo replaced behind an unchanged URI is a changed product: read every image's version first.
        from worker.producers.retag import check_image_versions

        check = check_image_versions(settings, progress=not as_json)
        click.echo(f"image check: {check.checked} images, {check.changed} changed, {check.unreadable} unreadable "
                   f"in {check.seconds:.1f}s", err=as_json)
    enqueued = False  # a nightly run not tagged inline comes back enqueued already
    if shadow is not None and resume is None:
        run_id = _start_shadow(settings, shadow, kind)
    elif kind == "nightly" and resume is None:
        # The same guard as beat's: never two nightly runs at once (Redis lock + database claim).
        run_id = _start_nightly_from_cli(settings, scope, inline, chunk, as_json, skip_image_check)
        enqueued = not inline
    else:
        run_id = resume if resume is not None else start_run(settings, scope=scope, kind=kind)
    if resume is not None:
        with session_scope(settings.database_url) as session:
            get_run(session, resume)
    _warn_other_taxonomy(settings, run_id)
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
    if (wait or inline) and info["failed"] and not info["done"] and not info.get("skipped"):
        from catalog.errors import StyletagError

        raise StyletagError(f"run {run_id} tagged nothing: all {info['failed']} products failed; "
                            f"'styletag report {run_id}' shows why")


def _start_nightly_from_cli(settings, scope: str, inline: bool, chunk: int, as_json: bool,
                            skip_image_check: bool) -> int:
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
        if busy is None and not skip_image_check:  # after the claim: a refused start reads no image
            from worker.producers.retag import check_image_versions

            check_image_versions(settings)
    else:
        out = start_nightly(settings, chunk=chunk, report_skip=False, check_images=not skip_image_check)
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


def _start_shadow(settings, version: str, kind: str) -> int:
    """A run of kind ``shadow`` over every product, for a registered model that is not retired."""
    from catalog.db import session_scope
    from catalog.errors import StyletagError
    from catalog.models import get_model
    from worker.producers.retag import start_run

    if kind == "nightly":
        raise StyletagError("--shadow runs are manual; drop --kind nightly")
    with session_scope(settings.database_url) as session:
        record = get_model(session, version)
    if record.status == "retired":
        raise StyletagError(f"model {record.version} is retired; 'styletag model list' shows the registry")
    return start_run(settings, scope="all", kind="shadow", model_version=record.version)


def _run_line(info: dict) -> str:
    return (f"run {info['id']:>5}  {info['kind']:<8} {info['scope']:<8} {info['status']:<9} "
            f"done {info['done']:>8} (review {info.get('review', 0)}) failed {info['failed']:>6} "
            f"skipped {info.get('skipped', 0)} total {info['total']:>8}  "
            f"model {info['model_version'][:16]}  started {info['created_at']}")


@click.command("runs")
@click.argument("run_id", type=RUN_ID, required=False)
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs_cmd(run_id, limit, as_json) -> None:
    """Show tagging runs and their counters."""
    from catalog.db import session_scope
    from catalog.runs import get_run, list_runs, run_as_dict

    settings = _settings()
    with session_scope(settings.database_url) as session:
        one = run_id is not None
        runs = [run_as_dict(get_run(session, run_id))] if one else [run_as_dict(r) for r in list_runs(session, limit)]
    if as_json:
        click.echo(json.dumps(runs[0] if one else runs, default=str))
        return
    for info in runs:
        click.echo(_run_line(info))
