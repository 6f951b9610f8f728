"""Label sync: idempotent, index order preserved, and a changed taxonomy is refused loudly."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from catalog.db import session_scope
from catalog.errors import NotFound, TaxonomyMismatch
from catalog.labels import label_map, sync_labels
from catalog.schema import LabelParent, StyleLabel
from model.taxonomy import Taxonomy, load_taxonomy


def test_sync_is_idempotent_and_ordered(db_url):
    tax = load_taxonomy("fashion-mnist")
    with session_scope(db_url) as s:
        first = sync_labels(s, tax)
    with session_scope(db_url) as s:
        second = sync_labels(s, tax)
        assert s.scalar(select(func.count()).select_from(StyleLabel)) == 16
        sneaker = s.get(StyleLabel, first.fine_ids[tax.fine.labels.index("sneaker")])
        assert (sneaker.name, sneaker.level, sneaker.position) == ("sneaker", "fine", 7)
        parents = s.scalars(select(StyleLabel.name).join(LabelParent, LabelParent.parent_id == StyleLabel.id)
                            .where(LabelParent.label_id == sneaker.id)).all()
        assert parents == ["shoes"]
    assert first == second
    assert len(first.coarse_ids) == 6 and len(first.fine_ids) == 10
    assert first.id_for("coarse", "shoes") == first.coarse_ids[5]
    with session_scope(db_url) as s:
        assert label_map(s, "fashion-mnist") == first


def test_changed_taxonomy_is_refused(db_url):
    tax = load_taxonomy("fashion-mnist")
    with session_scope(db_url) as s:
        sync_labels(s, tax)
    data = tax.to_dict()
    data["levels"]["fine"]["labels"][0], data["levels"]["fine"]["labels"][1] = (
        data["levels"]["fine"]["labels"][1], data["levels"]["fine"]["labels"][0])
    swapped = Taxonomy.from_dict(data)
    with pytest.raises(TaxonomyMismatch, match="fine labels"), session_scope(db_url) as s:
        sync_labels(s, swapped)
    data = tax.to_dict()
    data["levels"]["fine"]["labels"][7]["parents"] = ["tops"]
    with pytest.raises(TaxonomyMismatch, match="parent"), session_scope(db_url) as s:
        sync_labels(s, Taxonomy.from_dict(data))


def test_unknown_taxonomy_is_not_found(sqlite_url):
    with pytest.raises(NotFound), session_scope(sqlite_url) as s:
        label_map(s, "nope")
