"""``styletag review``: the products the model was unsure of, held back from the storefront."""

from __future__ import annotations

import click

from catalog.cli import current_settings, echo_json, table


@click.group("review")
def review() -> None:
    """The review queue: list held products, accept their tags (or correct them with 'styletag tags set')."""


@review.command("list")
@click.option("--level", type=click.Choice(["coarse", "fine", "colour"]), default=None,
              help="Order by the model's primary score at this level (default: the review confidence).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(level, limit, as_json) -> None:
    """Held products, least confident first, with their image URI."""
    from catalog.db import session_scope
    from catalog.review import queue_size, review_queue

    with session_scope(current_settings().database_url) as session:
        items = review_queue(session, level=level, limit=limit)
        size = queue_size(session)
    if as_json:
        echo_json({"size": size, "items": items})
        return
    if not items:
        click.echo("the review queue is empty")
        return
    rows = []
    for it in items:
        primary = {t["level"]: t["style"] for t in it["tags"] if t["is_primary"] and t["source"] == "model"}
        rows.append((it["sku"], it["reason"] or "", it["confidence"], primary.get("coarse", ""),
                     primary.get("fine", ""), it["image_uri"]))
    click.echo(table(rows, ["sku", "reason", "confidence", "coarse", "fine", "image"]))
    click.echo(f"{len(items)} of {size} held; 'styletag review accept SKU...' publishes, "
               "'styletag tags set SKU --level fine --style NAME' corrects")


@review.command("accept")
@click.argument("skus", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accept_cmd(skus, as_json) -> None:
    """Publish the model's tags of held products SKUS (they become human labels for training)."""
    from catalog.db import session_scope
    from catalog.review import accept

    with session_scope(current_settings().database_url) as session:
        out = accept(session, list(skus))
    if as_json:
        echo_json(out)
        return
    click.echo(f"accepted {len(out['accepted'])}" + (f"; not in review: {', '.join(out['not_in_review'][:20])}"
                                                     if out["not_in_review"] else ""))
