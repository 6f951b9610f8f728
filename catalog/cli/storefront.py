"""The storefront's commands: ``tags``, ``find``, ``facets``."""

from __future__ import annotations

import click

from catalog.cli import current_settings, echo_json, table

# --- storefront -------------------------------------------------------------------------------------


class Score(click.FloatRange):
    """A score between 0 and 1; NaN (which every comparison lets through) is refused."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number between 0 and 1", param, ctx)
        return number


@click.command("tags")
@click.argument("sku")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tags(sku: str, as_json: bool) -> None:
    """Show the coarse and fine tags of SKU, primary first."""
    from catalog.db import session_scope
    from catalog.queries import tags_for_sku

    with session_scope(current_settings().database_url) as session:
        data = tags_for_sku(session, sku)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{data['sku']}  {data['title']}  {data['image_uri']}")
    if not data["tags"]:
        click.echo("(not tagged yet)")
        return
    rows = [(t["level"], t["style"], t["score"], "*" if t["is_primary"] else "", t["model_version"]) for t in data["tags"]]
    click.echo(table(rows, ["level", "style", "score", "primary", "model"]))


@click.command("find")
@click.option("--style", required=True, help="Style name, e.g. sneaker or shoes.")
@click.option("--level", type=click.Choice(["coarse", "fine"]), default=None)
@click.option("--min-score", type=Score(0, 1), default=0.0, show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--after", default=None, help="Cursor from the previous page (next_cursor).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {items, next_cursor}.")
def find(style, level, min_score, limit, after, as_json) -> None:
    """List products with STYLE, best score first (keyset-paginated)."""
    from catalog.db import session_scope
    from catalog.queries import find_by_style

    with session_scope(current_settings().database_url) as session:
        items, next_cursor = find_by_style(session, style, level=level, min_score=min_score, limit=limit, after=after)
    if as_json:
        echo_json({"items": items, "next_cursor": next_cursor})
        return
    if not items:
        click.echo(f"no products tagged {style[:80]!r} with score >= {min_score}")
        return
    rows = [(i["sku"], i["level"], i["style"], i["score"], "*" if i["is_primary"] else "", i["title"]) for i in items]
    click.echo(table(rows, ["sku", "level", "style", "score", "primary", "title"]))
    if next_cursor:
        click.echo(f"next page: --after {next_cursor}")


@click.command("facets")
@click.option("--level", type=click.Choice(["coarse", "fine"]), default=None)
@click.option("--min-score", type=Score(0, 1), default=0.0, show_default=True)
@click.option("--all-tags", is_flag=True, help="Count every tag, not only primary ones.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def facets(level, min_score, all_tags, as_json) -> None:
    """Count products per style."""
    from catalog.db import session_scope
    from catalog.queries import facet_counts

    with session_scope(current_settings().database_url) as session:
        data = facet_counts(session, level=level, min_score=min_score, primary_only=not all_tags)
    if as_json:
        echo_json(data)
        return
    if not data:
        click.echo("no styles in the catalog yet; run 'styletag import fashion-mnist'")
        return
    click.echo(table([(d["taxonomy"], d["level"], d["style"], d["count"]) for d in data],
                      ["taxonomy", "level", "style", "products"]))
