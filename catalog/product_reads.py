"""Reads of products: what the worker re-reads for a batch of ids, and how SKUs become ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.errors import NotFound
from catalog.schema import Product

SKU_CHUNK = 1000


@dataclass(frozen=True)
class ProductImage:
    """What tagging one product needs: the row's image URI and the version the catalog knows of it."""

    product_id: int
    sku: str
    uri: str
    image_version: str | None


def images_for_tagging(session: Session, ids: Sequence[int]) -> list[ProductImage]:
    """Re-read the rows of ``ids`` (a task carries only ids; the database is the truth), in id order.
    Unknown ids are dropped."""
    rows = session.execute(
        select(Product.id, Product.sku, Product.image_uri, Product.image_version)
        .where(Product.id.in_(list(ids)))
        .order_by(Product.id)
    ).all()
    return [ProductImage(r[0], r[1], r[2], r[3]) for r in rows]


def ids_for_skus(session: Session, skus: Sequence[str]) -> list[int]:
    """Ids of ``skus`` in their order (duplicates once); any unknown SKU is a NotFound naming it."""
    wanted = list(dict.fromkeys(skus))
    found: dict[str, int] = {}
    for i in range(0, len(wanted), SKU_CHUNK):
        chunk = wanted[i : i + SKU_CHUNK]
        found.update(session.execute(select(Product.sku, Product.id).where(Product.sku.in_(chunk))).all())
    missing = [s for s in wanted if s not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NotFound(f"unknown SKU {missing[0][:80]!r}{more}; nothing was enqueued")
    return [found[s] for s in wanted]


# --- the way in: upsert, archive, image versions ------------------------------------------------------
