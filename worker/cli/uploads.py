"""``styletag enqueue``: hand new uploads to the uploads queue, by SKU or with their new photo."""

from __future__ import annotations

import click

from catalog.settings import Settings


@click.command("enqueue")
@click.argument("skus", nargs=-1, required=True)
@click.option("--image-uri", default=None,
              help="The product's (new) photo: the SKU is created or updated first, then tagged.")
@click.option("--title", default=None, help="With --image-uri: the product's title.")
def enqueue_cmd(skus, image_uri, title) -> None:
    """Enqueue products (new uploads) onto the uploads queue: existing SKUs, or one SKU with --image-uri
    (a brand-new product, or a new photo of an existing one)."""
    from worker.producers.uploads import enqueue_uploads

    if image_uri is None and title is not None:
        raise click.UsageError("--title goes with --image-uri (a product's title is set when its photo is)")
    if image_uri is not None and len(skus) != 1:
        raise click.UsageError(f"--image-uri goes with exactly one SKU, got {len(skus)}")
    items = [{"sku": skus[0], "image_uri": image_uri, "title": title}] if image_uri is not None else list(skus)
    ids = enqueue_uploads(items, Settings.from_env())
    click.echo(f"enqueued {len(ids)} products on the uploads queue")
