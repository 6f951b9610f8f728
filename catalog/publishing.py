"""What the storefront shows: the one rule for ``product_styles.published``.

A tag row is published iff its product is not archived, and

* it is a person's (``source = 'manual'``), or
* it is a model's, the product is not held for review (``tag_state.status = 'review'``), and no person set
  a tag at the same level of that product (their correction replaces the model's tag at that level).

The storefront view ``storefront_tags`` and the partial storefront index show published rows only. Every
path that changes tags, overrides, review status or archiving calls :func:`refresh_published` for the
products it touched, in its own transaction. The tag writer, which writes thousands of rows a second,
computes the same rule per row with :func:`published` as it writes (one rule, two spellings:
``tests/catalog/test_lifecycle.py`` checks that a refresh after a write changes nothing).

Whatever is derived from the published rows (the facet counts of ``catalog.facets``) is kept in step by
:func:`published_changed`, which both paths call last, for the products they touched.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from catalog.schema import Product, ProductStyle, StyleLabel, TagState

CHUNK = 1000


def published(*, source: str, archived: bool, in_review: bool, manual_at_level: bool) -> bool:
    """The rule for one row (see the module docstring)."""
    if archived:
        return False
    return source == "manual" or (not in_review and not manual_at_level)


def _rule():
    ps = ProductStyle.__table__
    products, state = Product.__table__, TagState.__table__
    m = ps.alias("manual_row")
    ml = StyleLabel.__table__.alias("manual_label")
    sl = StyleLabel.__table__.alias("row_label")
    archived = exists().where(products.c.id == ps.c.product_id, products.c.archived_at.is_not(None))
    in_review = exists().where(state.c.product_id == ps.c.product_id, state.c.status == "review")
    manual_here = exists(
        select(1).select_from(m.join(ml, ml.c.id == m.c.label_id).join(sl, sl.c.level == ml.c.level))
        .where(m.c.product_id == ps.c.product_id, m.c.source == "manual", sl.c.id == ps.c.label_id)
    )
    return and_(~archived, or_(ps.c.source == "manual", and_(~in_review, ~manual_here)))


def refresh_published(session: Session, product_ids: Iterable[int]) -> int:
    """Re-apply the rule to every tag row of ``product_ids`` (in the caller's transaction); returns how many
    rows changed. Rows already right are not rewritten."""
    ids = sorted({int(p) for p in product_ids})
    ps = ProductStyle.__table__
    changed = 0
    for i in range(0, len(ids), CHUNK):
        rule = _rule()
        result = session.execute(
            update(ps).where(ps.c.product_id.in_(ids[i:i + CHUNK]), ps.c.published != rule).values(published=rule)
            .execution_options(synchronize_session=False)
        )
        changed += result.rowcount or 0
    published_changed(session, ids)
    return changed


def published_changed(session: Session, product_ids: Iterable[int]) -> None:
    """The published rows of ``product_ids`` may have changed: bring what is derived from them up to date
    (``catalog.facets.resync_tag_sets``). Called last, in the caller's transaction (it takes the counter
    locks)."""
    from catalog.facets import resync_tag_sets

    resync_tag_sets(session, product_ids)
