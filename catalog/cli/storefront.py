"""The storefront's commands: ``tags``, ``find``, ``facets``, ``browse``."""

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


class _TagsGroup(click.Group):
    """``tags SKU`` shows a product's tags; ``tags set`` / ``tags clear`` correct them. A first argument that
    is not a sub-command is a SKU (``tags show SKU`` for a SKU named like a sub-command)."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands:
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


@click.group("tags", cls=_TagsGroup, invoke_without_command=False,
             context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
def tags() -> None:
    """Show a product's tags (tags SKU [--json]), or correct them by hand (tags set / tags clear)."""


@tags.command("show")
@click.argument("sku")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_tags(sku: str, as_json: bool) -> None:
    """Show the tags of SKU, primary first: what the storefront shows, then what it hides (held for review,
    or replaced by a person's tag at that level)."""
    from catalog.db import session_scope
    from catalog.overrides import product_tags

    with session_scope(current_settings().database_url) as session:
        data = product_tags(session, sku)
    if as_json:
        echo_json(data)
        return
    click.echo(f"{data['sku']}  {data['title']}  {data['image_uri']}")
    if not data["tags"]:
        click.echo("(not tagged yet)")
        return
    rows = [(t["level"], t["style"], t["score"], "*" if t["is_primary"] else "", t["source"],
             "yes" if t["published"] else "no", t["set_by"] or t["model_version"]) for t in data["tags"]]
    click.echo(table(rows, ["level", "style", "score", "primary", "source", "shown", "model / set by"]))


@tags.command("set")
@click.argument("sku")
@click.option("--level", type=click.Choice(["coarse", "fine", "colour"]), required=True)
@click.option("--style", required=True, help="The style name at that level, e.g. jeans.")
@click.option("--taxonomy", default=None, help="Only needed when several taxonomies have this style.")
@click.option("--by", default=None, help="Who sets it (default: this OS account).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def set_tags(sku, level, style, taxonomy, by, as_json) -> None:
    """Set SKU's tag at LEVEL by hand (its parent level follows the taxonomy). No retag, activation,
    rollback or shadow run ever overwrites it; it becomes a human label for training."""
    from catalog.db import session_scope
    from catalog.models import operator
    from catalog.overrides import set_tag

    with session_scope(current_settings().database_url) as session:
        out = set_tag(session, sku, level=level, style=style, by=by or operator(), taxonomy=taxonomy)
    if as_json:
        echo_json(out)
        return
    click.echo(f"{out['sku']}: " + ", ".join(f"{lvl} = {name}" for lvl, name in out["set"]) + f" (by {out['set_by']})"
               + ("; released from review" if out["resolved_review"] else ""))


@tags.command("clear")
@click.argument("sku")
@click.option("--level", type=click.Choice(["coarse", "fine", "colour"]), default=None,
              help="Only this level (default: every level).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def clear_tags_cmd(sku, level, as_json) -> None:
    """Remove SKU's manual tags: the model's tags are shown again."""
    from catalog.db import session_scope
    from catalog.overrides import clear_tags

    with session_scope(current_settings().database_url) as session:
        out = clear_tags(session, sku, level=level)
    if as_json:
        echo_json(out)
        return
    click.echo(out.get("message") or f"{out['sku']}: cleared {', '.join(out['cleared'])}")


@click.command("find")
@click.option("--style", required=True, help="Style name, e.g. sneaker or shoes.")
@click.option("--level", type=click.Choice(["coarse", "fine", "colour"]), default=None)
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
@click.option("--level", type=click.Choice(["coarse", "fine", "colour"]), default=None)
@click.option("--min-score", type=Score(0, 1), default=0.0, show_default=True)
@click.option("--all-tags", is_flag=True, help="Count every tag, not only primary ones.")
@click.option("--within", "within", multiple=True,
              help="Count within the products showing this style (any level; repeatable: --within tops "
                   "--within navy), as 'styletag browse' does: fine styles and colours, every shown tag.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def facets(level, min_score, all_tags, within, as_json) -> None:
    """Count products per style (with --within: within a selection, the counts of 'styletag browse')."""
    from catalog.db import session_scope
    from catalog.queries import facet_counts

    if within:
        if all_tags:
            raise click.UsageError("--within counts every shown tag already; leave out --all-tags")
        _facets_within(within, level, min_score, as_json)
        return
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


def _facets_within(within, level, min_score, as_json) -> None:
    from catalog.browse import facets_within
    from catalog.db import session_scope

    with session_scope(current_settings().database_url) as session:
        data = facets_within(session, list(within), min_score=min_score)
    if level is not None:
        data["facets"] = {lvl: items for lvl, items in data["facets"].items() if lvl == level}
    if as_json:
        echo_json(data)
        return
    click.echo(f"{data['products']} products show {' + '.join(data['styles'])}")
    rows = [(f["taxonomy"], lvl, f["style"], f["count"]) for lvl, items in data["facets"].items() for f in items]
    if rows:
        click.echo(table(rows, ["taxonomy", "level", "style", "products"]))


@click.command("browse")
@click.option("--style", "styles", multiple=True,
              help="Narrow to the products showing this style (any level); repeatable: --style tops --style navy.")
@click.option("--min-score", type=Score(0, 1), default=0.0, show_default=True,
              help="Lowest browse score (see below) of a listed or counted product.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--after", default=None, help="Cursor from the previous page (next_cursor).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {styles, min_score, products, facets, items, next_cursor}.")
def browse(styles, min_score, limit, after, as_json) -> None:
    """Drill down: the products showing every --style (none: the whole catalog), best browse score first
    (keyset-paginated), and the counts of the next choice: fine styles and colours within the selection
    (coarse styles too when nothing is selected).

    \b
    A product shows a style when it has a published tag of it (primary or secondary): the rows of the
    storefront_tags view (not archived, not held for review, a person's correction in place of the
    model's tag). Its browse score is the mean score of all its published tags (every level), rounded to
    6 decimals: one figure per product, the same whatever is selected. Ties go by product id.
    """
    from catalog.browse import browse as run_browse
    from catalog.db import session_scope

    with session_scope(current_settings().database_url) as session:
        data = run_browse(session, list(styles), min_score=min_score, limit=limit, after=after)
    if as_json:
        echo_json(data)
        return
    where = f" show {' + '.join(data['styles'])}" if data["styles"] else " in the catalog"
    click.echo(f"{data['products']} products{where}")
    for lvl, items in data["facets"].items():
        if items:
            shown = ", ".join(f"{f['style']} {f['count']}" for f in items[:12])
            more = f", ... ({len(items) - 12} more)" if len(items) > 12 else ""
            click.echo(f"  {lvl}: {shown}{more}")
    if not data["items"]:
        return
    click.echo(table([(i["sku"], i["score"], i["title"]) for i in data["items"]], ["sku", "score", "title"]))
    if data["next_cursor"]:
        click.echo(f"next page: --after {data['next_cursor']}")
