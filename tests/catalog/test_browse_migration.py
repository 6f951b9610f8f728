"""Migration 0003 on a catalog that already has tags: the upgrade fills the tag sets, memberships and
counts from the published rows (as resync would), the downgrade drops them and keeps every tag, and the
upgrade again gives the same tables."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import inspect, text

from catalog import migrate
from catalog.browse import browse, facets_within
from catalog.db import make_engine, read_connection
from catalog.schema import BROWSE_VIEWS
from tests.catalog import browse_helpers as bf


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_new_database")()


def _fill_0002(url: str, rng: random.Random) -> int:
    """Labels of two levels and colours, 60 products, random tags (a share unpublished, one product with
    none shown) written with plain SQL, as a 0002 catalog has them."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            labels = []
            for level, names in (("coarse", ("tops", "shoes")), ("fine", ("shirt", "tee", "sneaker")),
                                 ("colour", ("navy", "black"))):
                for i, name in enumerate(names):
                    conn.execute(text("INSERT INTO style_labels (taxonomy, level, name, position) "
                                      "VALUES ('t', :l, :n, :i)"), {"l": level, "n": name, "i": i})
            labels = [lid for lid, in conn.execute(text("SELECT id FROM style_labels ORDER BY id"))]
            for p in range(60):
                conn.execute(text("INSERT INTO products (sku, title, image_uri) VALUES (:s, :t, 'file:///x.png')"),
                             {"s": f"sku-{p:03d}", "t": f"product {p}"})
            pids = [pid for pid, in conn.execute(text("SELECT id FROM products ORDER BY id"))]
            rows = [{"p": pid, "l": lid, "s": rng.choice((0.25, 0.5, 0.8, 0.95)), "pub": rng.random() < 0.85 and pid != pids[0]}
                    for pid in pids for lid in rng.sample(labels, rng.randint(1, 4))]
            conn.execute(text("INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, "
                              "tagged_at, published) VALUES (:p, :l, :s, true, 'm', '2026-01-01', :pub)"), rows)
            return len(rows)
    finally:
        engine.dispose()


def test_0003_fills_from_existing_tags_both_ways(empty_url):
    migrate.upgrade(empty_url, "0002")
    n_tags = _fill_0002(empty_url, random.Random(4))
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == "0003"
    with read_connection(empty_url) as conn:
        bf.assert_exact(conn)
        first = bf.stored(conn)
        shown, pos = bf.shown(conn), bf.positions(conn)
        assert len(first["members"]) == len(shown) < 60  # the product with no shown tag has no set
        for names in ([], ["tops"], ["tops", "navy"]):
            assert facets_within(conn, names) == bf.facets(shown, pos, names)
            assert [i["product_id"] for i in browse(conn, names, limit=100)["items"]] == bf.selection(shown, names)
    migrate.downgrade(empty_url, "0002")
    engine = make_engine(empty_url)
    try:
        insp = inspect(engine)
        assert not set(BROWSE_VIEWS) & set(insp.get_view_names())
        assert not {"tag_sets", "tag_set_labels", "product_tag_sets", "label_pairs"} & set(insp.get_table_names())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM product_styles")).scalar() == n_tags
    finally:
        engine.dispose()
    migrate.upgrade(empty_url)
    with read_connection(empty_url) as conn:
        again = bf.stored(conn)
    # set ids may differ; keys, memberships and counts do not
    assert again == first
