"""``styletag import`` and ``styletag taxonomy``: products, photos, labels and taxonomies in."""

from __future__ import annotations

import sys

import click

from catalog.cli import current_settings, echo_json, table

# --- import -----------------------------------------------------------------------------------------


@click.group("import")
def import_cmd() -> None:
    """Import datasets as catalog products."""


@import_cmd.command("catalog")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--taxonomy", default=None, help="Taxonomy of the label columns (applied with 'styletag taxonomy apply').")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="File format (default: by extension, else by the first byte).")
@click.option("--strict", is_flag=True, help="Any rejected row aborts the import; nothing is written.")
@click.option("--archive-missing", is_flag=True,
              help="The file is the whole catalog: archive products it does not name (nothing is deleted).")
@click.option("--skip-image-check", is_flag=True,
              help="Do not read image versions (HEAD); keep the file's image_version column or none.")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=1000, show_default=True,
              help="Rows per transaction.")
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False), default=None,
              help="Write every rejected row (line, sku, reason, message) to this CSV file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_catalog_cmd(file, taxonomy, fmt, strict, archive_missing, skip_image_check, batch_size, rejects_path,
                       as_json) -> None:
    """Import a shop's catalog from FILE (CSV or JSON Lines; - reads stdin): sku, image_uri, optional
    title, image_version and label:<level> columns. Upserts by SKU; running it twice changes nothing."""
    from catalog.importers.catalog_file import import_catalog_file, write_rejections
    from catalog.product_rows import RowsRejected

    settings = current_settings()
    try:
        report = import_catalog_file(
            file, settings=settings, taxonomy=taxonomy, fmt=fmt, strict=strict,
            archive_missing_products=archive_missing, check_images=not skip_image_check, batch_size=batch_size,
            progress=sys.stderr.isatty() and not as_json,
        )
    except RowsRejected as exc:
        if rejects_path:
            write_rejections(rejects_path, exc.rejections)
        _show_rejections(exc.rejections, rejects_path)
        raise
    if rejects_path:
        write_rejections(rejects_path, report.rejected)
    if as_json:
        echo_json(report.as_dict())
        return
    _show_rejections(report.rejected, rejects_path)
    for line in report.warnings[:10]:
        click.echo(f"warning: {line}", err=True)
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(report.rejected_by_reason().items()))
    click.echo(
        f"{file}: {report.rows} rows: {report.inserted} inserted, {report.updated} updated, {report.unchanged} "
        f"unchanged, {report.archived} archived, {len(report.rejected)} rejected"
        + (f" ({by_reason})" if by_reason else "")
        + f"; truth labels +{report.truth_added} -{report.truth_removed}"
        + (f"; {report.images_unreadable} images unreadable" if report.images_unreadable else "")
        + f"; {report.rows_per_s:,.0f} rows/s, {report.seconds:.1f}s"
    )


SHOWN_REJECTIONS = 20


def _show_rejections(rejections, rejects_path) -> None:
    for r in rejections[:SHOWN_REJECTIONS]:
        click.echo(f"rejected: {r}", err=True)
    if len(rejections) > SHOWN_REJECTIONS:
        where = f"{rejects_path} lists" if rejects_path else "--rejects FILE writes"
        click.echo(f"rejected: ... and {len(rejections) - SHOWN_REJECTIONS} more ({where} them all)", err=True)


@import_cmd.command("fashion-mnist")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="Import only the first N images.")
@click.option("--store", "store_url", default=None, help="Object store URL (default: STYLETAG_STORE_URL).")
@click.option("--size", type=click.IntRange(8, 2048), default=28, show_default=True,
              help="Upscale images to PX (bicubic) to mimic product photos.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpeg"]), default="png", show_default=True)
@click.option("--source", type=click.Path(file_okay=False), default=None,
              help="Folder with the IDX files (default /usr/share/datasets/fashion-mnist).")
@click.option("--render", type=click.Choice(["grey", "photo"]), default="grey", show_default=True,
              help="grey: the 28 px items upscaled; photo: colour product photos (JPEG 600-1000 px) and a CSV.")
@click.option("--out-csv", type=click.Path(dir_okay=False), default=None,
              help="With --render photo: the CSV to write (default: STYLETAG_HOME/fashion-mnist-photo-SPLIT.csv).")
@click.option("--procs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="With --render photo: rendering processes.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_fashion_mnist_cmd(split, limit, store_url, size, fmt, source, render, out_csv, procs, as_json) -> None:
    """Import Fashion-MNIST images as products with ground-truth styles. Idempotent.

    With --render photo, each item becomes a colour product photo in the store, listed with its coarse,
    fine and colour labels in a CSV that 'styletag import catalog' takes; the CSV is then imported."""
    from catalog.importers import import_fashion_mnist

    settings = current_settings()
    if render == "photo":
        _import_photos(settings, split, limit, store_url, source, out_csv, procs, as_json)
        return
    report = import_fashion_mnist(
        settings.database_url, store_url or settings.store_url, split, limit=limit, size=size, fmt=fmt,
        source=source, progress=sys.stderr.isatty() and not as_json,
    )
    if as_json:
        echo_json(report.as_dict())
        return
    click.echo(
        f"fashion-mnist {split}: {report.total} products ({report.inserted} new, {report.updated} updated, "
        f"{report.unchanged} unchanged); {report.images_written} images written, {report.images_kept} kept; "
        f"{report.truth_inserted} truth rows; {report.seconds:.1f}s"
    )



def _import_photos(settings, split, limit, store_url, source, out_csv, procs, as_json) -> None:
    from catalog.importers.photos import render_fashion_mnist_photos

    out_csv = out_csv or str(settings.home / f"fashion-mnist-photo-{split}.csv")
    report = render_fashion_mnist_photos(split, out_csv, settings=settings, store_url=store_url, limit=limit,
                                         source=source, procs=procs, progress=sys.stderr.isatty() and not as_json)
    if as_json:
        echo_json(report.as_dict())
        return
    imported = report.imported
    click.echo(
        f"fashion-mnist {split} photos: {report.total} rendered ({report.written} written, {report.kept} kept) "
        f"at {report.photos_per_s:.1f} photos/s; {out_csv}: {imported['inserted']} inserted, "
        f"{imported['updated']} updated, {imported['unchanged']} unchanged, {imported['rejected']} rejected"
    )


# --- taxonomy ---------------------------------------------------------------------------------------


@click.group("taxonomy")
def taxonomy_cmd() -> None:
    """Apply or show the catalog's taxonomies (style labels, their levels and parents)."""


@taxonomy_cmd.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--force", is_flag=True, help="Remove labels even if tags or truth labels use them (they go too).")
@click.option("--json", "as_json", is_flag=True, help="Print what changed as JSON.")
def taxonomy_apply(file, force, as_json) -> None:
    """Make the catalog's labels of FILE's taxonomy what FILE says (JSON: name, levels coarse and fine with
    parents, optional colour). Applying the same file twice changes nothing."""
    import json

    from catalog.db import session_scope
    from catalog.errors import TaxonomyError
    from catalog.labels import apply_taxonomy

    try:
        text = click.open_file(file, "r", encoding="utf-8").read()
        data = json.loads(text)
    except OSError as exc:
        raise TaxonomyError(f"cannot read {file}: {exc.strerror or exc.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise TaxonomyError(f"taxonomy file {file} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise TaxonomyError(f"taxonomy file {file} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    with session_scope(current_settings().database_url) as session:
        change = apply_taxonomy(session, data, force=force)
    if as_json:
        echo_json(change.as_dict())
        return
    if not change.changed:
        click.echo(f"taxonomy {change.taxonomy}: unchanged")
        return
    parts = [f"{'created' if change.created else 'changed'}"]
    for what, by_level in (("added", change.added), ("removed", change.removed)):
        for level, names in by_level.items():
            parts.append(f"{what} {len(names)} {level} ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    if change.reparented:
        parts.append(f"new parents for {', '.join(change.reparented[:8])}")
    if change.reordered:
        parts.append(f"{change.reordered} labels moved")
    if any(change.orphaned.values()):
        o = change.orphaned
        parts.append(f"removed with them: {o['tags']} tags, {o['truth']} truth labels, {o['shadow']} shadow tags")
    click.echo(f"taxonomy {change.taxonomy}: " + "; ".join(parts))
    for version in change.active_models:
        click.echo(f"warning: active model {version[:16]} was trained on the old labels of {change.taxonomy}; it "
                   "refuses to tag until a model for these labels is activated", err=True)


@taxonomy_cmd.command("show")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the taxonomy file ('taxonomy apply' takes it).")
def taxonomy_show(name, as_json) -> None:
    """Show the catalog's taxonomies (or NAME's): levels, labels, parents, and how many tags and truth
    labels use each label."""
    from catalog.db import session_scope
    from catalog.errors import NotFound
    from catalog.labels import label_usage, read_taxonomy, taxonomy_names

    with session_scope(current_settings().database_url) as session:
        names = [name] if name else taxonomy_names(session)
        if not names:
            raise NotFound("no taxonomy in the catalog; apply one with 'styletag taxonomy apply FILE.json'")
        taxonomies = [read_taxonomy(session, n) for n in names]
        usage = {t.name: label_usage(session, t.name) for t in taxonomies}
    if as_json:
        echo_json(taxonomies[0].to_dict() if name else [t.to_dict() for t in taxonomies])
        return
    for t in taxonomies:
        click.echo(f"{t.name}" + (" (multi-label)" if t.multi_label else ""))
        rows = []
        for level in ("coarse", "fine", "colour"):
            for label in t.labels.get(level, []):
                use = usage[t.name].get(t.ids[(level, label)], {})
                rows.append((level, label, ", ".join(t.parents.get(label, [])), use.get("tags", 0),
                             use.get("truth", 0)))
        click.echo(table(rows, ["level", "label", "parents", "tags", "truth"]))
