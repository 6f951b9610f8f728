"""Style labels in the catalog, kept in step with a model's taxonomy.

Models speak in label *indices* (fine label 7); the catalog speaks in ``style_labels.id``. A
:class:`LabelMap` translates between them, and :func:`label_map` refuses to build one when the
catalog's labels for that taxonomy name differ from the taxonomy at hand: writing tags through a
shifted map would silently mislabel every product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from catalog.db import dialect_insert
from catalog.errors import NotFound, TaxonomyMismatch
from catalog.schema import LabelParent, StyleLabel
from model.taxonomy import Taxonomy


@dataclass(frozen=True)
class LabelMap:
    """``coarse_ids[i]`` / ``fine_ids[j]`` are the catalog ids of the taxonomy's i-th coarse and j-th
    fine label; ``by_name[(level, name)]`` is the id of a label by name."""

    taxonomy: str
    coarse_ids: list[int]
    fine_ids: list[int]
    by_name: dict[tuple[str, str], int] = field(default_factory=dict)

    def id_for(self, level: str, name: str) -> int:
        try:
            return self.by_name[(level, name)]
        except KeyError:
            raise NotFound(f"no {level} style {name!r} in taxonomy {self.taxonomy!r}") from None


def _rows(session: Session, taxonomy: str) -> list[StyleLabel]:
    stmt = select(StyleLabel).where(StyleLabel.taxonomy == taxonomy).order_by(StyleLabel.level, StyleLabel.position)
    return list(session.scalars(stmt))


def sync_labels(session: Session, taxonomy: Taxonomy) -> LabelMap:
    """Insert the taxonomy's labels if missing (idempotent, safe against a concurrent importer via
    ON CONFLICT DO NOTHING) and return the verified map. Does not commit."""
    if _rows(session, taxonomy.name):
        # A known taxonomy must match as it is: inserting a renamed label first would report a gap.
        return label_map(session, taxonomy.name, expect=taxonomy)
    rows = [{"taxonomy": taxonomy.name, "level": level.name, "name": name, "position": i}
            for level in (taxonomy.coarse, taxonomy.fine) for i, name in enumerate(level.labels)]
    session.execute(dialect_insert(session, StyleLabel).on_conflict_do_nothing(), rows)
    ids = {(row.level, row.name): row.id for row in _rows(session, taxonomy.name)}
    links = [{"label_id": ids[("fine", name)], "parent_id": ids[("coarse", taxonomy.coarse.labels[c])]}
             for f, name in enumerate(taxonomy.fine.labels) for c in taxonomy.parents[f]]
    session.execute(dialect_insert(session, LabelParent).on_conflict_do_nothing(), links)
    return label_map(session, taxonomy.name, expect=taxonomy)


def label_map(session: Session, taxonomy_name: str, expect: Taxonomy | None = None) -> LabelMap:
    """The catalog's labels of ``taxonomy_name``; NotFound when there are none, TaxonomyMismatch when
    ``expect`` is given and the names, order or parents differ."""
    rows = _rows(session, taxonomy_name)
    if not rows:
        raise NotFound(f"no labels for taxonomy {taxonomy_name!r} in the catalog; import or sync it first")
    coarse = [r for r in rows if r.level == "coarse"]
    fine = [r for r in rows if r.level == "fine"]
    if [r.position for r in coarse] != list(range(len(coarse))) or [r.position for r in fine] != list(range(len(fine))):
        raise TaxonomyMismatch(f"catalog labels of taxonomy {taxonomy_name!r} have gaps in their positions")
    if expect is not None:
        _compare(expect, coarse, fine)
    by_name = {(r.level, r.name): r.id for r in rows}
    return LabelMap(
        taxonomy=taxonomy_name, coarse_ids=[r.id for r in coarse], fine_ids=[r.id for r in fine], by_name=by_name
    )


def _compare(tax: Taxonomy, coarse: list[StyleLabel], fine: list[StyleLabel]) -> None:
    hint = "use a new taxonomy name for a changed label set"
    have = [r.name for r in coarse]
    if have != list(tax.coarse.labels):
        raise TaxonomyMismatch(
            f"taxonomy {tax.name!r}: catalog has coarse labels {have}, the model has {list(tax.coarse.labels)}; {hint}"
        )
    have = [r.name for r in fine]
    if have != list(tax.fine.labels):
        raise TaxonomyMismatch(
            f"taxonomy {tax.name!r}: catalog has fine labels {have}, the model has {list(tax.fine.labels)}; {hint}"
        )
    session = object_session(fine[0]) if fine else None
    links: dict[int, set[int]] = {}
    if session is not None:
        for label_id, parent_id in session.execute(
                select(LabelParent.label_id, LabelParent.parent_id)
                .where(LabelParent.label_id.in_([r.id for r in fine]))):
            links.setdefault(label_id, set()).add(parent_id)
    for i, row in enumerate(fine):
        want = {coarse[c].id for c in tax.parents[i]}
        if links.get(row.id, set()) != want:
            raise TaxonomyMismatch(
                f"taxonomy {tax.name!r}: fine label {row.name!r} has a different coarse parent in the catalog; {hint}"
            )
