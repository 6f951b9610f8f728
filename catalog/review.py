"""The review queue: products whose prediction the model is unsure of, held back from the storefront.

The tag writer (``catalog.tags``) gives a product status ``review`` when its prediction falls under the
checkpoint's review threshold or is flagged out of distribution: its tags are written, unpublished
(``catalog.publishing``). A person then either accepts them (:func:`accept`: published, and its primary
labels become ``style_truth`` with source ``review``, so the next training learns from them and the next
retag does not send it back to review) or corrects them (``catalog.overrides.set_tag``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, aliased

from catalog.db import dialect_insert
from catalog.errors import StyletagError
from catalog.products import ids_for_skus
from catalog.publishing import refresh_published
from catalog.schema import LEVELS, Product, ProductStyle, StyleLabel, StyleTruth, TagState


def queue_size(session: Session) -> int:
    """Products held for review (archived ones excluded)."""
    return int(session.scalar(select(func.count()).select_from(TagState)
                              .join(Product, Product.id == TagState.product_id)
                              .where(TagState.status == "review", Product.archived_at.is_(None))) or 0)


def review_queue(session: Session, *, level: str | None = None, limit: int = 50) -> list[dict]:
    """Held products, least confident first (by ``tag_state.confidence``, or with ``level`` by the score of
    the model's primary tag at that level), with their image URI and the model's tags."""
    if level is not None and level not in LEVELS:
        raise StyletagError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    limit = max(1, min(int(limit), 10_000))
    query = (select(Product.id, Product.sku, Product.title, Product.image_uri, TagState.reason, TagState.confidence,
                    TagState.model_version, TagState.run_id)
             .join(TagState, TagState.product_id == Product.id)
             .where(TagState.status == "review", Product.archived_at.is_(None)))
    if level is not None:
        lab = aliased(StyleLabel)
        primary = (select(ProductStyle.product_id, ProductStyle.score)
                   .join(lab, and_(lab.id == ProductStyle.label_id, lab.level == level))
                   .where(ProductStyle.is_primary, ProductStyle.source == "model").subquery())
        query = query.join(primary, primary.c.product_id == Product.id).order_by(primary.c.score, Product.id)
    else:
        query = query.order_by(TagState.confidence.is_(None).desc(), TagState.confidence, Product.id)
    rows = session.execute(query.limit(limit)).all()
    tags: dict[int, list[dict]] = {}
    if rows:
        for pid, lvl, name, score, primary_flag, source in session.execute(
                select(ProductStyle.product_id, StyleLabel.level, StyleLabel.name, ProductStyle.score,
                       ProductStyle.is_primary, ProductStyle.source)
                .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
                .where(ProductStyle.product_id.in_([r.id for r in rows]))
                .order_by(ProductStyle.product_id, ProductStyle.is_primary.desc(), ProductStyle.score.desc())):
            tags.setdefault(pid, []).append({"level": lvl, "style": name, "score": score,
                                             "is_primary": bool(primary_flag), "source": source})
    return [{"sku": r.sku, "title": r.title, "image_uri": r.image_uri, "reason": r.reason,
             "confidence": r.confidence, "model_version": r.model_version, "run_id": r.run_id,
             "tags": tags.get(r.id, [])} for r in rows]


def accept(session: Session, skus: Sequence[str]) -> dict:
    """Publish the model's tags of held products (in the caller's transaction). Unknown SKUs are an error
    before anything changes; SKUs not in review are reported, not changed. Returns
    ``{"accepted": [sku, ...], "not_in_review": [sku, ...]}``."""
    ids = ids_for_skus(session, skus)
    if not ids:
        return {"accepted": [], "not_in_review": []}
    session.execute(select(Product.id).where(Product.id.in_(ids)).order_by(Product.id).with_for_update()).all()
    held = set(session.scalars(select(TagState.product_id)
                               .where(TagState.product_id.in_(ids), TagState.status == "review")))
    sku_of = dict(session.execute(select(Product.id, Product.sku).where(Product.id.in_(ids))).all())
    if held:
        ts = TagState.__table__
        session.execute(update(ts).where(ts.c.product_id.in_(sorted(held)), ts.c.status == "review")
                        .values(status="tagged", reason=None))
        # The model's primary labels become human labels, except at levels a person already set.
        manual_levels = {(pid, lvl) for pid, lvl in session.execute(
            select(ProductStyle.product_id, StyleLabel.level).join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
            .where(ProductStyle.product_id.in_(sorted(held)), ProductStyle.source == "manual"))}
        now = datetime.now(UTC)
        truth = [{"product_id": pid, "label_id": lid, "source": "review", "created_at": now}
                 for pid, lid, lvl in session.execute(
                     select(ProductStyle.product_id, ProductStyle.label_id, StyleLabel.level)
                     .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
                     .where(ProductStyle.product_id.in_(sorted(held)), ProductStyle.is_primary,
                            ProductStyle.source == "model"))
                 if (pid, lvl) not in manual_levels]
        if truth:
            st = StyleTruth.__table__
            for pid in held:  # the accepted label replaces any other human label at its level
                levels = {row["label_id"] for row in truth if row["product_id"] == pid}
                same_levels = select(StyleLabel.id).where(StyleLabel.level.in_(
                    select(StyleLabel.level).where(StyleLabel.id.in_(levels))))
                session.execute(st.delete().where(st.c.product_id == pid, st.c.label_id.in_(same_levels),
                                                  st.c.label_id.not_in(levels)))
            ins = dialect_insert(session, StyleTruth)  # a label already known (imported) is now person-confirmed
            session.execute(ins.on_conflict_do_update(index_elements=["product_id", "label_id"],
                                                      set_={"source": "review", "created_at": ins.excluded.created_at}),
                            truth)
        refresh_published(session, sorted(held))
    return {"accepted": [sku_of[p] for p in ids if p in held],
            "not_in_review": [sku_of[p] for p in ids if p not in held]}
