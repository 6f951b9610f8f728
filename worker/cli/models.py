"""``styletag model``: the registry (register, list, activate, rollback, retire) and shadow comparison.

The rollout (docs/operations.md): ``model register NEW.safetensors`` → ``retag --shadow VERSION --wait`` →
``model compare VERSION`` → ``model activate VERSION`` → ``retag --changed-only --wait``; and back with
``model rollback`` → ``retag --changed-only --wait``. Workers follow activation without a restart.
"""

from __future__ import annotations

import json

import click

from catalog.settings import Settings


def _settings() -> Settings:
    return Settings.from_env()


def _bootstrap(settings: Settings) -> None:
    """Register and activate the configured checkpoint when the registry has no active model of the served
    taxonomy. Models of several taxonomies active is no obstacle here: activating or registering is how an
    operator sorts that out."""
    from worker.context import SeveralTaxonomies, ensure_serving

    try:
        ensure_serving(settings)
    except SeveralTaxonomies:
        pass


def _who(by: str | None) -> str:
    from catalog.models import operator

    return (by or operator())[:128]


def _line(m: dict) -> str:
    return (f"{m['version']}  {m['status']:<7} {m['taxonomy']:<16} {m['backbone']:<14} trained {m['trained_at']}"
            + (f"  activated {m['activated_at']} by {m['activated_by']}" if m["activated_at"] else ""))


@click.group("model")
def model() -> None:
    """The model registry: register, shadow-compare, activate, roll back and retire models."""


@model.command("register")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--activate", "then_activate", is_flag=True, help="Activate it right away (skips the shadow step).")
@click.option("--by", default=None, help="Who activates (default: this OS account).")
@click.option("--json", "as_json", is_flag=True, help="Print the registered model as JSON.")
def register_cmd(path, then_activate, by, as_json) -> None:
    """Register the checkpoint PATH (verified: weights and metadata against its version) as a shadow model."""
    from catalog.db import session_scope
    from catalog.models import activate, register_checkpoint
    from model.checkpoint import load_checkpoint
    settings = _settings()
    load_checkpoint(path)  # a modified or unreadable file is refused before it is registered
    _bootstrap(settings)  # the registry knows what is served now, so rollback can come back to it
    with session_scope(settings.database_url) as session:
        record = register_checkpoint(session, path)
        if then_activate:
            record = activate(session, record.version, by=_who(by))
    info = record.as_dict()
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"registered model {record.version} ({record.taxonomy}, {record.backbone}) from {record.path}: "
               f"{record.status}")
    if record.status == "shadow":
        click.echo(f"next: styletag retag --shadow {record.version} --wait; styletag model compare {record.version}")


@model.command("list")
@click.option("--taxonomy", default=None, help="Only this taxonomy's models.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(taxonomy, as_json) -> None:
    """The registered models, the active one of each taxonomy first."""
    from catalog.db import session_scope
    from catalog.models import list_models

    with session_scope(_settings().database_url) as session:
        models = [m.as_dict() for m in list_models(session, taxonomy)]
    if as_json:
        click.echo(json.dumps(models))
        return
    if not models:
        click.echo("no model registered yet; the first 'styletag retag' or worker registers the configured one")
        return
    for m in models:
        click.echo(_line(m))


def _activation_report(before, record, cancelled: list[int]) -> dict:
    return {"active": record.as_dict(), "replaced": before.version if before is not None else None,
            "cancelled_runs": cancelled}


@model.command("activate")
@click.argument("version")
@click.option("--by", default=None, help="Who activates (default: this OS account).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def activate_cmd(version, by, as_json) -> None:
    """Make VERSION the active model of its taxonomy: workers switch to it; runs of the model it replaces are
    cancelled. Then 'styletag retag --changed-only' retags the catalog with it."""
    from catalog.db import session_scope
    from catalog.models import activate, active_model, get_model, superseded_runs
    settings = _settings()
    _bootstrap(settings)
    with session_scope(settings.database_url) as session:
        target = get_model(session, version)
        before = active_model(session, target.taxonomy)
        cancelled = superseded_runs(session, target.taxonomy, target.version)
        record = activate(session, target.version, by=_who(by))
        out = _activation_report(before, record, cancelled)
    _echo_activation(out, as_json)


def _echo_activation(out: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(out))
        return
    active = out["active"]
    replaced = f", replacing {out['replaced']}" if out["replaced"] and out["replaced"] != active["version"] else ""
    click.echo(f"active model of {active['taxonomy']}: {active['version']}{replaced}")
    if out["cancelled_runs"]:
        click.echo(f"cancelled superseded runs: {', '.join(map(str, out['cancelled_runs']))}")
    click.echo("next: styletag retag --changed-only --wait")


@model.command("rollback")
@click.option("--taxonomy", default=None, help="The taxonomy to roll back (needed when several have a model).")
@click.option("--by", default=None, help="Who rolls back (default: this OS account).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rollback_cmd(taxonomy, by, as_json) -> None:
    """Re-activate the previously active model. Then 'styletag retag --changed-only' puts its tags back."""
    from catalog.db import session_scope
    from catalog.models import previous_model, rollback, superseded_runs, taxonomy_of_choice

    with session_scope(_settings().database_url) as session:
        tax = taxonomy_of_choice(session, taxonomy)
        target = previous_model(session, tax)
        cancelled = superseded_runs(session, tax, target.version) if target is not None else []
        record, before = rollback(session, by=_who(by), taxonomy=tax)
        out = _activation_report(before, record, cancelled)
    _echo_activation(out, as_json)


@model.command("retire")
@click.argument("version")
@click.option("--by", default=None, help="Who retires it (default: this OS account).")
def retire_cmd(version, by) -> None:
    """Take a model that is not active out of rollback's reach."""
    from catalog.db import session_scope
    from catalog.models import retire

    with session_scope(_settings().database_url) as session:
        record = retire(session, version, by=_who(by))
    click.echo(f"model {record.version}: retired")


@model.command("compare")
@click.argument("version")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare_cmd(version, html_path, as_json) -> None:
    """Compare VERSION's shadow predictions ('retag --shadow VERSION') with the current tags: agreement,
    accuracy of both against human labels, flips, confidence shift."""
    from catalog.db import session_scope
    from catalog.errors import StyletagError
    from catalog.shadow import compare, compare_html

    with session_scope(_settings().database_url) as session:
        data = compare(session, version)
    if html_path:
        try:
            with open(html_path, "w", encoding="utf-8") as fh:
                fh.write(compare_html(data))
        except OSError as exc:
            raise StyletagError(f"cannot write {html_path}: {exc.strerror or exc.__class__.__name__}") from None
    if as_json:
        click.echo(json.dumps(data))
        return
    if not data["shadow_products"]:
        click.echo(f"model {data['version']} has no shadow predictions yet; run "
                   f"'styletag retag --shadow {data['version']} --wait' first")
        return
    click.echo(f"model {data['version']} ({data['status']}): {data['shadow_products']} products with shadow "
               "predictions")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for level, d in data["levels"].items():
        click.echo(f"  {level:<7} agree {d['agree']}/{d['compared']} ({pct(d['agreement'])})  accuracy current "
                   f"{pct(d['accuracy_current'])} shadow {pct(d['accuracy_shadow'])} on {d['with_truth']} labelled  "
                   f"confidence {d['mean_confidence_current']} -> {d['mean_confidence_shadow']}")
        for f in d["flips"][:10]:
            click.echo(f"          {f['current']} -> {f['shadow']}: {f['products']}")
    if html_path:
        click.echo(f"written to {html_path}")
