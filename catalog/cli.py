"""CLI commands of the catalog: ``db``, ``import``, ``tags``, ``find``, ``facets``.

They are plain click objects that ``worker/cli.py`` mounts on the ``styletag`` group (which turns a
StyletagError into ``error: <message>`` and its exit code). None of them imports torch, so the
storefront commands start fast. ``--json`` prints JSON and nothing else on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from catalog.settings import Settings


def _settings() -> Settings:
    return Settings.from_env()


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A small aligned table for humans: numbers right-aligned, text left-aligned."""
    cells = [list(headers)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    return "\n".join(
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)).rstrip()
        for r in cells
    )


# --- db ---------------------------------------------------------------------------------------------


@click.group("db")
def db() -> None:
    """Create or migrate the catalog schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Migrate the catalog at STYLETAG_DATABASE_URL up to REVISION."""
    from catalog.migrate import current, upgrade
    from catalog.settings import redact_url

    url = _settings().database_url
    upgrade(url, revision)
    click.echo(f"{redact_url(url)}: at revision {current(url) or 'base'}")


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True, help="Target revision (base drops everything).")
def db_downgrade(revision: str) -> None:
    """Migrate the catalog down to REVISION."""
    from catalog.migrate import current, downgrade
    from catalog.settings import redact_url

    url = _settings().database_url
    downgrade(url, revision)
    click.echo(f"{redact_url(url)}: at revision {current(url) or 'base'}")


@db.command("current")
def db_current() -> None:
    """Print the catalog's schema revision ('base' when not migrated)."""
    from catalog.migrate import current

    click.echo(current(_settings().database_url) or "base")


# --- import -----------------------------------------------------------------------------------------


@click.group("import")
def import_cmd() -> None:
    """Import datasets as catalog products."""


@import_cmd.command("fashion-mnist")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Import only the first N images.")
@click.option("--store", "store_url", default=None, help="Object store URL (default: STYLETAG_STORE_URL).")
@click.option("--size", type=click.IntRange(8, 2048), default=28, show_default=True,
              help="Upscale images to PX (bicubic) to mimic product photos.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True)
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="Folder with the IDX files (default /usr/share/datasets/fashion-mnist).")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_fashion_mnist_cmd(split, limit, store_url, size, fmt, source, as_json) -> None:
    """Import Fashion-MNIST images as products with ground-truth styles. Idempotent."""
    from catalog.importers import import_fashion_mnist

    settings = _settings()
    report = import_fashion_mnist(
        settings.database_url, store_url or settings.store_url, split, limit=limit, size=size, fmt=fmt,
        source=source, progress=sys.stderr.isatty() and not as_json,
    )
    if as_json:
        _echo_json(report.as_dict())
        return
    click.echo(
        f"fashion-mnist {split}: {report.total} products ({report.inserted} new, {report.updated} updated, "
        f"{report.unchanged} unchanged); {report.images_written} images written, {report.images_kept} kept; "
        f"{report.truth_inserted} truth rows; {report.seconds:.1f}s"
    )


# --- storefront -------------------------------------------------------------------------------------


@click.command("tags")
@click.argument("sku")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tags(sku: str, as_json: bool) -> None:
    """Show the coarse and fine tags of SKU, primary first."""
    from catalog.db import session_scope
    from catalog.queries import tags_for_sku

    with session_scope(_settings().database_url) as session:
        data = tags_for_sku(session, sku)
    if as_json:
        _echo_json(data)
        return
    click.echo(f"{data['sku']}  {data['title']}  {data['image_uri']}")
    if not data["tags"]:
        click.echo("(not tagged yet)")
        return
    rows = [(t["level"], t["style"], t["score"], "*" if t["is_primary"] else "", t["model_version"]) for t in data["tags"]]
    click.echo(_table(rows, ["level", "style", "score", "primary", "model"]))


@click.command("find")
@click.option("--style", required=True, help="Style name, e.g. sneaker or shoes.")
@click.option("--level", type=click.Choice(["coarse", "fine"]), default=None)
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--after", default=None, help="Cursor from the previous page (next_cursor).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {items, next_cursor}.")
def find(style, level, min_score, limit, after, as_json) -> None:
    """List products with STYLE, best score first (keyset-paginated)."""
    from catalog.db import session_scope
    from catalog.queries import find_by_style

    with session_scope(_settings().database_url) as session:
        items, next_cursor = find_by_style(session, style, level=level, min_score=min_score, limit=limit, after=after)
    if as_json:
        _echo_json({"items": items, "next_cursor": next_cursor})
        return
    if not items:
        click.echo(f"no products tagged {style!r} with score >= {min_score}")
        return
    rows = [(i["sku"], i["level"], i["style"], i["score"], "*" if i["is_primary"] else "", i["title"]) for i in items]
    click.echo(_table(rows, ["sku", "level", "style", "score", "primary", "title"]))
    if next_cursor:
        click.echo(f"next page: --after {next_cursor}")


@click.command("facets")
@click.option("--level", type=click.Choice(["coarse", "fine"]), default=None)
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--all-tags", is_flag=True, help="Count every tag, not only primary ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def facets(level, min_score, all_tags, as_json) -> None:
    """Count products per style."""
    from catalog.db import session_scope
    from catalog.queries import facet_counts

    with session_scope(_settings().database_url) as session:
        data = facet_counts(session, level=level, min_score=min_score, primary_only=not all_tags)
    if as_json:
        _echo_json(data)
        return
    if not data:
        click.echo("no styles in the catalog yet; run 'styletag import fashion-mnist'")
        return
    click.echo(_table([(d["taxonomy"], d["level"], d["style"], d["count"]) for d in data],
                      ["taxonomy", "level", "style", "products"]))
