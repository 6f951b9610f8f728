"""Storefront queries: tags of a SKU, keyset pagination that returns every row exactly once (ties
included), facet counts, and NotFound / BadCursor for bad input."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from catalog.db import session_scope
from catalog.errors import NotFound
from catalog.models import register_model
from catalog.queries import BadCursor, facet_counts, find_by_style, tags_for_sku
from catalog.tags import ProductTags, Tag, write_batch


@pytest.fixture
def tagged(db_url, seed):
    """300 products, each tagged with a fine and a coarse label; scores drawn from few values (ties)."""
    cat = seed(db_url, 300)
    lm = cat.labels
    rng = random.Random(7)
    batch = []
    for pid in cat.ids:
        fine = rng.choice([5, 7, 9])  # shoes: sandal, sneaker, ankle boot
        score = rng.choice([0.5, 0.75, 0.9, 1.0])
        batch.append(ProductTags(pid, "v", [Tag(lm.coarse_ids[5], 0.99, True), Tag(lm.fine_ids[fine], score, True),
                                            Tag(lm.coarse_ids[0], 0.01, False)]))
    with session_scope(db_url) as s:
        register_model(s, "m1", datetime(2025, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
        write_batch(s, run_id=None, model_version="m1", tagged=batch, failed=[])
    return cat, batch


def _expected(batch, label_id, min_score=0.0):
    rows = [(t.score, b.product_id) for b in batch for t in b.tags if t.label_id == label_id and t.score >= min_score]
    return [pid for _, pid in sorted(rows, key=lambda r: (-r[0], r[1]))]


def test_keyset_pagination_returns_every_row_once(tagged):
    cat, batch = tagged
    sneaker = cat.labels.fine_ids[7]
    for min_score, limit in ((0.0, 7), (0.75, 10), (0.0, 1000)):
        seen, cursor = [], None
        with session_scope(cat.url) as s:
            while True:
                items, cursor = find_by_style(s, "sneaker", level="fine", min_score=min_score, limit=limit, after=cursor)
                seen += [i["product_id"] for i in items]
                assert all(i["style"] == "sneaker" and i["score"] >= min_score for i in items)
                if cursor is None:
                    break
        assert seen == _expected(batch, sneaker, min_score)


def test_find_item_shape_and_coarse_level(tagged):
    cat, _ = tagged
    with session_scope(cat.url) as s:
        items, cursor = find_by_style(s, "shoes", limit=5)
    assert cursor is not None and len(items) == 5
    assert set(items[0]) == {"sku", "title", "image_uri", "product_id", "level", "style", "score", "is_primary",
                             "model_version", "tagged_at"}
    assert items[0]["level"] == "coarse" and items[0]["score"] == 0.99 and items[0]["model_version"] == "m1"


def test_tags_for_sku_primary_first(tagged):
    cat, _ = tagged
    with session_scope(cat.url) as s:
        data = tags_for_sku(s, "p00000")
    assert data["sku"] == "p00000" and data["image_uri"] == "file:///img/0.png"
    flags = [t["is_primary"] for t in data["tags"]]
    assert flags == [True, True, False]
    assert data["tags"][0]["score"] >= data["tags"][1]["score"]
    assert data["tags"][2]["style"] == "tops" and data["tags"][0]["tagged_at"].endswith("+00:00")


def test_facets(tagged):
    cat, batch = tagged
    with session_scope(cat.url) as s:
        fine = {f["style"]: f["count"] for f in facet_counts(s, level="fine")}
        coarse = {f["style"]: f["count"] for f in facet_counts(s, level="coarse", primary_only=False)}
        strict = {f["style"]: f["count"] for f in facet_counts(s, level="fine", min_score=0.9)}
    assert sum(fine.values()) == 300 and fine["trouser"] == 0 and len(fine) == 10
    assert coarse["shoes"] == 300 and coarse["tops"] == 300
    assert sum(strict.values()) == sum(1 for b in batch if b.tags[1].score >= 0.9)


def test_unknown_sku_style_and_bad_cursor(tagged):
    cat, _ = tagged
    with session_scope(cat.url) as s:
        with pytest.raises(NotFound, match="SKU"):
            tags_for_sku(s, "nope")
        with pytest.raises(NotFound, match="style"):
            find_by_style(s, "nope")
        with pytest.raises(NotFound):
            find_by_style(s, "sneaker", level="coarse")
        for bad in ("garbage!", "e30", "W10", "eyJzIjoiYSIsInAiOjF9"):  # {}, [], {"s":"a","p":1}
            with pytest.raises(BadCursor):
                find_by_style(s, "sneaker", after=bad)
        with pytest.raises(ValueError):  # BadCursor is a ValueError too
            find_by_style(s, "sneaker", after="%%%")


def test_sku_lookup_is_parameterised(tagged):
    cat, _ = tagged
    with session_scope(cat.url) as s, pytest.raises(NotFound):
        tags_for_sku(s, "p00000' OR '1'='1")


def test_read_connection_answers_like_a_session_and_blocks_no_writer(tagged):
    from sqlalchemy import text

    from catalog.db import read_connection

    cat, batch = tagged
    with session_scope(cat.url) as s:
        want_find = find_by_style(s, "sneaker", level="fine", limit=20)
        want_tags = tags_for_sku(s, "p00000")
    with read_connection(cat.url) as conn:
        assert find_by_style(conn, "sneaker", level="fine", limit=20) == want_find
        assert tags_for_sku(conn, "p00000") == want_tags
        # the open read connection holds no transaction: a writer commits meanwhile (SQLite: no lock held)
        with session_scope(cat.url) as s:
            s.execute(text("UPDATE products SET title = 'renamed' WHERE sku = 'p00000'"))
        assert tags_for_sku(conn, "p00000")["title"] == "renamed"


def test_a_stale_cached_label_id_is_never_answered(tagged):
    """Label ids are cached per database URL; a database re-created under the same URL renumbers them.
    Every query checks the style of the rows it got (and looks again on an empty page)."""
    import catalog.queries as q

    cat, batch = tagged
    with session_scope(cat.url) as s:
        want = find_by_style(s, "sneaker", level="fine", limit=1000)
        key = q._label_key(s, "sneaker", "fine")
        assert q._label_cache[key] == (cat.labels.fine_ids[7],)
        for wrong in ((cat.labels.fine_ids[5],), (10**9,)):  # another style's id; an id that does not exist
            q._label_cache[key] = wrong
            assert find_by_style(s, "sneaker", level="fine", limit=1000) == want
            assert q._label_cache[key] == (cat.labels.fine_ids[7],)


def test_storefront_queries_show_published_tags_only(tagged):
    """An archived product and a product held for review vanish from find, tags and facets (as from the
    storefront view); un-archived, the product is back."""
    from sqlalchemy import text

    from catalog.products import archive_ids, republish
    from catalog.publishing import refresh_published

    cat, batch = tagged
    archived, held = batch[0].product_id, batch[1].product_id

    def shoes_count(s) -> int:
        return next(f["count"] for f in facet_counts(s, level="coarse") if f["style"] == "shoes")

    def found(s) -> set[int]:
        items, _ = find_by_style(s, "shoes", level="coarse", limit=1000)
        return {i["product_id"] for i in items}

    with session_scope(cat.url) as s:
        assert {archived, held} <= found(s) and shoes_count(s) == len(batch)
        archive_ids(s, [archived])
        s.execute(text("UPDATE tag_state SET status = 'review' WHERE product_id = :p"), {"p": held})
        refresh_published(s, [held])
    with session_scope(cat.url) as s:
        assert archived not in found(s) and held not in found(s)
        assert shoes_count(s) == len(batch) - 2
        view = s.execute(text("SELECT count(DISTINCT product_id) FROM storefront_tags WHERE style = 'shoes'")).scalar()
        assert view == len(batch) - 2
        hidden_sku = s.execute(text("SELECT sku FROM products WHERE id = :p"), {"p": held}).scalar()
        assert tags_for_sku(s, hidden_sku)["tags"] == []
        republish_ids = [archived]
        s.execute(text("UPDATE products SET archived_at = NULL WHERE id = :p"), {"p": archived})
        republish(s, republish_ids)
    with session_scope(cat.url) as s:
        assert archived in found(s) and shoes_count(s) == len(batch) - 1
