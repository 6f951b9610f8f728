"""Archived products: hidden from the storefront and skipped by retags, never deleted; back when imported again."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from catalog.db import session_scope
from catalog.product_reads import SKU_CHUNK, ids_for_skus
from catalog.publishing import refresh_published
from catalog.schema import Product
from catalog.settings import Settings

_P = Product.__table__

def republish(session: Session, product_ids: Sequence[int]) -> None:
    """Un-archived products: their tags are shown again, as the publishing rule says."""
    refresh_published(session, list(product_ids))


def archive_ids(session: Session, product_ids: Sequence[int]) -> int:
    """Archive products in the caller's transaction: kept with their tags and history, hidden from the
    storefront (their tags unpublished), skipped by retags. Returns how many were not archived yet."""
    now = datetime.now(UTC)
    n = 0
    for i in range(0, len(product_ids), SKU_CHUNK):
        chunk = list(product_ids[i : i + SKU_CHUNK])
        n += session.execute(update(_P).where(_P.c.id.in_(chunk), _P.c.archived_at.is_(None))
                             .values(archived_at=now, updated_at=now)).rowcount or 0
    refresh_published(session, list(product_ids))  # the one rule; also keeps the facet counts exact
    return n


def archive_products(skus: Sequence[str], *, settings: Settings | None = None) -> int:
    """Archive products by SKU (nothing is deleted; importing or uploading the SKU again brings it back).
    An unknown SKU is a NotFound and nothing is archived. Returns how many were newly archived."""
    settings = settings or Settings.from_env()
    with session_scope(settings.database_url) as session:
        return archive_ids(session, ids_for_skus(session, list(skus)))


def archive_missing(keep: set[str], *, settings: Settings | None = None, page: int = 10_000) -> int:
    """Archive every product whose SKU is not in ``keep`` (the full catalog a file describes); each page
    of ids its own transaction. Returns how many were newly archived."""
    settings = settings or Settings.from_env()
    last, n = 0, 0
    while True:
        with session_scope(settings.database_url) as session:
            rows = session.execute(select(_P.c.id, _P.c.sku).where(_P.c.id > last, _P.c.archived_at.is_(None))
                                   .order_by(_P.c.id).limit(page)).all()
            if not rows:
                return n
            last = rows[-1].id
            n += archive_ids(session, [r.id for r in rows if r.sku not in keep])


def archived_skus(session: Session, skus: Sequence[str]) -> list[str]:
    """Which of ``skus`` are archived (in their order)."""
    found: set[str] = set()
    wanted = list(dict.fromkeys(skus))
    for i in range(0, len(wanted), SKU_CHUNK):
        found.update(session.scalars(select(_P.c.sku).where(_P.c.sku.in_(wanted[i : i + SKU_CHUNK]),
                                                            _P.c.archived_at.is_not(None))))
    return [s for s in wanted if s in found]
