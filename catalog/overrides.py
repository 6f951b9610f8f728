"""A person's corrections: ``styletag tags set SKU --level fine --style jeans`` and ``tags clear``.

A manual tag is a ``product_styles`` row with ``source = 'manual'`` (score 1, primary, ``set_by`` who,
``tagged_at`` when, ``model_version`` ``manual``). No model write ever deletes or overwrites it
(``catalog.tags``), whatever retag, activation, rollback or shadow run comes later; at its level the
model's rows stay in the table, unpublished, so clearing the correction shows them again at once. Setting
a fine style also sets its coarse parent (when the taxonomy gives it exactly one). A correction is a human
label: it replaces the product's ``style_truth`` at that level (source ``manual``) for the next training,
and it resolves a product held for review.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.errors import NotFound, StyletagError
from catalog.publishing import refresh_published
from catalog.schema import LEVELS, LabelParent, Product, ProductStyle, StyleLabel, StyleTruth, TagState

MANUAL_VERSION = "manual"


class OverrideError(StyletagError):
    """A correction that cannot be applied as asked (ambiguous taxonomy, unknown level)."""


def _product(session: Session, sku: str) -> Product:
    product = session.scalars(select(Product).where(Product.sku == sku).with_for_update()).first()
    if product is None:
        raise NotFound(f"no product with SKU {sku[:80]!r}")
    return product


def _taxonomy_for(session: Session, product_id: int, level: str, style: str | None, taxonomy: str | None) -> str:
    if taxonomy is not None:
        return taxonomy
    have = session.scalars(select(StyleLabel.taxonomy).join(ProductStyle, ProductStyle.label_id == StyleLabel.id)
                           .where(ProductStyle.product_id == product_id).distinct()).all()
    if len(have) == 1:
        return have[0]
    query = select(StyleLabel.taxonomy).where(StyleLabel.level == level).distinct()
    if style is not None:
        query = query.where(StyleLabel.name == style)
    known = session.scalars(query).all()
    if len(known) == 1:
        return known[0]
    if not known:
        what = f"{level} style {style[:80]!r}" if style else f"{level} styles"
        raise NotFound(f"no {what} in any taxonomy; 'styletag facets' lists the styles")
    raise OverrideError(f"several taxonomies have {level} style {style[:80]!r} ({', '.join(sorted(known))}); "
                        "say which with --taxonomy")


def _label(session: Session, taxonomy: str, level: str, name: str) -> int:
    label_id = session.scalar(select(StyleLabel.id).where(StyleLabel.taxonomy == taxonomy, StyleLabel.level == level,
                                                          StyleLabel.name == name))
    if label_id is None:
        names = session.scalars(select(StyleLabel.name).where(StyleLabel.taxonomy == taxonomy, StyleLabel.level == level)
                                .order_by(StyleLabel.position)).all()
        raise NotFound(f"no {level} style {name[:80]!r} in taxonomy {taxonomy[:64]!r}; "
                       f"choose one of {', '.join(names)[:300]}")
    return label_id


def _level_labels(taxonomy: str, level: str):
    return select(StyleLabel.id).where(StyleLabel.taxonomy == taxonomy, StyleLabel.level == level)


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise OverrideError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")


def _set_level(session: Session, pid: int, taxonomy: str, level: str, label_id: int, by: str, now: datetime) -> None:
    ps = ProductStyle.__table__
    session.execute(delete(ps).where(ps.c.product_id == pid, ps.c.source == "manual", ps.c.label_id != label_id,
                                     ps.c.label_id.in_(_level_labels(taxonomy, level))))
    ins = dialect_insert(session, ProductStyle)
    session.execute(ins.on_conflict_do_update(
        index_elements=["product_id", "label_id"],
        set_={"score": 1.0, "is_primary": True, "model_version": MANUAL_VERSION, "tagged_at": now, "source": "manual",
              "published": True, "set_by": by},
    ), [{"product_id": pid, "label_id": label_id, "score": 1.0, "is_primary": True, "model_version": MANUAL_VERSION,
         "tagged_at": now, "source": "manual", "published": True, "set_by": by}])
    st = StyleTruth.__table__
    session.execute(delete(st).where(st.c.product_id == pid, st.c.label_id.in_(_level_labels(taxonomy, level))))
    session.execute(dialect_insert(session, StyleTruth).on_conflict_do_nothing(),
                    [{"product_id": pid, "label_id": label_id, "source": "manual", "created_at": now}])


def _resolve_review(session: Session, pid: int) -> bool:
    state = session.get(TagState, pid)
    if state is None or state.status != "review":
        return False
    session.execute(update(TagState.__table__).where(TagState.__table__.c.product_id == pid)
                    .values(status="tagged", reason=None))
    return True


def set_tag(session: Session, sku: str, *, level: str, style: str, by: str, taxonomy: str | None = None) -> dict:
    """Set a product's tag at ``level`` by hand (in the caller's transaction). Returns what was set:
    ``{"sku", "taxonomy", "set": [(level, style), ...], "resolved_review": bool}``."""
    _check_level(level)
    product = _product(session, sku)
    taxonomy = _taxonomy_for(session, product.id, level, style, taxonomy)
    label_id = _label(session, taxonomy, level, style)
    now = datetime.now(UTC)
    by = (by or "unknown")[:128]
    targets = [(level, label_id, style)]
    if level == "fine":
        parents = session.execute(select(StyleLabel.id, StyleLabel.name)
                                  .join(LabelParent, LabelParent.parent_id == StyleLabel.id)
                                  .where(LabelParent.label_id == label_id)).all()
        if len(parents) == 1:
            targets.append(("coarse", parents[0][0], parents[0][1]))
    elif level == "coarse":
        # A manual fine tag that is not a child of the new coarse style would contradict it: it goes.
        children = select(LabelParent.label_id).where(LabelParent.parent_id == label_id)
        ps = ProductStyle.__table__
        session.execute(delete(ps).where(ps.c.product_id == product.id, ps.c.source == "manual",
                                         ps.c.label_id.in_(_level_labels(taxonomy, "fine")),
                                         ps.c.label_id.not_in(children)))
    for lvl, lid, _ in targets:
        _set_level(session, product.id, taxonomy, lvl, lid, by, now)
    resolved = _resolve_review(session, product.id)
    refresh_published(session, [product.id])
    return {"sku": product.sku, "taxonomy": taxonomy, "set": [(lvl, name) for lvl, _, name in targets],
            "set_by": by, "resolved_review": resolved}


def clear_tags(session: Session, sku: str, *, level: str | None = None, taxonomy: str | None = None) -> dict:
    """Remove a product's manual tags (at ``level``, or every level) and the human labels they made. The
    model's tags at those levels are published again; where the model has no primary tag at a cleared
    level (the person's label was the model's own, so the model row was never kept), ``tag_state`` is reset
    so that the next ``retag --changed-only`` tags the product again."""
    if level is not None:
        _check_level(level)
    product = _product(session, sku)
    ps = ProductStyle.__table__
    manual = session.execute(select(ps.c.label_id, StyleLabel.level, StyleLabel.taxonomy)
                             .join(StyleLabel, StyleLabel.id == ps.c.label_id)
                             .where(ps.c.product_id == product.id, ps.c.source == "manual")).all()
    if level is not None:
        manual = [m for m in manual if m.level == level]
    if taxonomy is not None:
        manual = [m for m in manual if m.taxonomy == taxonomy]
    if not manual:
        where = f" at level {level}" if level else ""
        return {"sku": product.sku, "cleared": [], "message": f"{product.sku} has no manual tag{where}"}
    label_ids = [m.label_id for m in manual]
    session.execute(delete(ps).where(ps.c.product_id == product.id, ps.c.source == "manual",
                                     ps.c.label_id.in_(label_ids)))
    st = StyleTruth.__table__
    for m in manual:
        session.execute(delete(st).where(st.c.product_id == product.id, st.c.source == "manual",
                                         st.c.label_id.in_(_level_labels(m.taxonomy, m.level))))
    levels = sorted({(m.taxonomy, m.level) for m in manual})
    for tax, lvl in levels:
        has_primary = session.scalar(select(ps.c.label_id).where(ps.c.product_id == product.id, ps.c.is_primary,
                                                                 ps.c.label_id.in_(_level_labels(tax, lvl))).limit(1))
        if has_primary is None:
            session.execute(update(TagState.__table__).where(TagState.__table__.c.product_id == product.id)
                            .values(model_version=""))
    refresh_published(session, [product.id])
    return {"sku": product.sku, "cleared": [lvl for _, lvl in levels]}


def product_tags(session: Session, sku: str) -> dict:
    """A product and all of its tag rows, published first, then primary first, then by score: the shape
    of ``catalog.queries.tags_for_sku`` plus each row's ``source``, ``published`` and ``set_by``."""
    from catalog.queries import _iso

    product = session.execute(select(Product.id, Product.sku, Product.title, Product.image_uri)
                              .where(Product.sku == sku)).first()
    if product is None:
        raise NotFound(f"no product with SKU {sku[:80]!r}")
    rows = session.execute(
        select(StyleLabel.level, StyleLabel.name, ProductStyle.score, ProductStyle.is_primary,
               ProductStyle.model_version, ProductStyle.tagged_at, ProductStyle.source, ProductStyle.published,
               ProductStyle.set_by)
        .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
        .where(ProductStyle.product_id == product.id)
        .order_by(ProductStyle.published.desc(), ProductStyle.is_primary.desc(), ProductStyle.score.desc(),
                  StyleLabel.level, StyleLabel.name)).all()
    return {"sku": product.sku, "title": product.title, "image_uri": product.image_uri,
            "tags": [{"level": r.level, "style": r.name, "score": r.score, "is_primary": bool(r.is_primary),
                      "model_version": r.model_version, "tagged_at": _iso(r.tagged_at), "source": r.source,
                      "published": bool(r.published), "set_by": r.set_by} for r in rows]}
