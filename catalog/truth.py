"""Reads of ``style_truth`` for training and evaluation: each labelled product of a taxonomy with its image and
its truth label names per level (coarse, fine, colour). ``worker.training`` builds datasets from these rows;
nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.schema import Product, StyleLabel, StyleTruth

PAGE = 20_000


@dataclass
class TruthRow:
    """One product with truth labels of the taxonomy: ``labels[level]`` = the names of that level."""

    product_id: int
    sku: str
    image_uri: str
    image_version: str | None
    labels: dict[str, list[str]] = field(default_factory=dict)


def truth_rows(session: Session, taxonomy: str, *, include_archived: bool = False) -> Iterator[TruthRow]:
    """Every product with at least one truth label of ``taxonomy``, in product id order (pages of
    :data:`PAGE` products, so memory stays bounded by the page, not the catalog)."""
    after = 0
    while True:
        ids_q = (select(StyleTruth.product_id).join(StyleLabel, StyleLabel.id == StyleTruth.label_id)
                 .where(StyleLabel.taxonomy == taxonomy, StyleTruth.product_id > after)
                 .group_by(StyleTruth.product_id).order_by(StyleTruth.product_id).limit(PAGE))
        ids = list(session.scalars(ids_q))
        if not ids:
            return
        after = ids[-1]
        prod_q = select(Product.id, Product.sku, Product.image_uri, Product.image_version).where(Product.id.in_(ids))
        if not include_archived:
            prod_q = prod_q.where(Product.archived_at.is_(None))
        rows = {r[0]: TruthRow(r[0], r[1], r[2], r[3]) for r in session.execute(prod_q)}
        labels_q = (select(StyleTruth.product_id, StyleLabel.level, StyleLabel.name)
                    .join(StyleLabel, StyleLabel.id == StyleTruth.label_id)
                    .where(StyleLabel.taxonomy == taxonomy, StyleTruth.product_id.in_(ids))
                    .order_by(StyleTruth.product_id, StyleLabel.level, StyleLabel.position))
        for pid, level, name in session.execute(labels_q):
            row = rows.get(pid)
            if row is not None:
                row.labels.setdefault(level, []).append(name)
        for pid in ids:
            if pid in rows:
                yield rows[pid]
