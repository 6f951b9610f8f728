"""``styletag import``: products in."""

from __future__ import annotations

import sys

import click

from catalog.cli import current_settings, echo_json

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

    settings = current_settings()
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
