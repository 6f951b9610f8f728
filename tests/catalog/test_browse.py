"""Storefront browse (issue 17): the drill-down's products and counts equal a brute-force computation over
the storefront view for random selections of a generated catalog (hypothesis), whichever plan serves the
page; keyset pagination returns every product exactly once, ties included; names are matched afresh
after a taxonomy change; bad input is one typed error."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import catalog.browse as browse_mod
from catalog.browse import browse, browse_page, facets_within
from catalog.db import read_connection, session_scope
from catalog.errors import NotFound, StyletagError
from catalog.facets import confidence_of, resync_tag_sets
from catalog.queries import BadCursor
from tests.catalog import browse_helpers as bf

PLANS = {
    "auto": {},
    "walk": {"SET_DESCENT_ROWS": 10**9},  # always the walk (its cap never reached)
    "sets": {"SET_DESCENT_ROWS": -(10**9)},  # always the per-set plan
    "capped": {"SET_DESCENT_ROWS": 10**9, "WALK_CAP_FACTOR": 0, "WALK_MIN_CAP": 3},  # the walk, cut short
}


@pytest.fixture
def catalog(db_url, seed):
    """160 products with random published tags at three levels (some with none; the colour 'navy' in two
taxonomies), their sets resynced."""
    cat = seed(db_url, 160)
    rng = random.Random(17)
    with session_scope(db_url) as s:
        bf.add_colours(s)
        bf.add_colours(s, taxonomy="shop-v2", names=("navy", "teal"))  # 'navy' twice: a name of two labels
        bf.random_tags(s, cat.ids, rng)
        resync_tag_sets(s, cat.ids)
    return cat


def _all_pages(conn, names, min_score=0.0, limit=10):
    seen, cursor, pages = [], None, 0
    while True:
        items, cursor = browse_page(conn, names, min_score=min_score, limit=limit, after=cursor)
        assert len(items) <= limit
        seen += items
        pages += 1
        assert pages < 1000
        if cursor is None:
            return seen


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_drilldown_equals_brute_force_over_the_view(catalog, data):
    with read_connection(catalog.url) as conn:
        products, pos = bf.shown(conn), bf.positions(conn)
        names_all = sorted({n for p in products.values() for n in p.names})
        names = data.draw(st.lists(st.sampled_from(names_all), max_size=3, unique=True), label="styles")
        min_score = data.draw(st.sampled_from([0.0, 0.0, 0.5, 0.7, 0.9]), label="min_score")
        limit = data.draw(st.integers(3, 15), label="limit")
        plan = data.draw(st.sampled_from(sorted(PLANS)), label="plan")
        with pytest.MonkeyPatch.context() as mp:
            for knob, value in PLANS[plan].items():
                mp.setattr(browse_mod, knob, value)
            assert facets_within(conn, names, min_score) == bf.facets(products, pos, names, min_score)
            want = bf.selection(products, names, min_score)
            got = _all_pages(conn, names, min_score, limit)
            assert [i["product_id"] for i in got] == want
            assert [i["score"] for i in got] == [products[p].confidence for p in want]
            assert [i["sku"] for i in got] == [products[p].sku for p in want]
            first = browse(conn, names, min_score=min_score, limit=limit)
            assert [i["product_id"] for i in first["items"]] == want[:limit]
            assert first["products"] == len(want) and (first["next_cursor"] is not None) == (len(want) > limit)


def test_pagination_with_ties_returns_every_product_once(db_url, seed):
    """Every product with the same browse score: the keyset tie-breaker (product id) alone orders them."""
    cat = seed(db_url, 57)
    lm = cat.labels
    with session_scope(db_url) as s:
        colours = bf.add_colours(s)
        from sqlalchemy import insert

        from catalog.schema import ProductStyle

        s.execute(insert(ProductStyle.__table__), [
            {"product_id": pid, "label_id": lid, "score": 0.8, "is_primary": True, "model_version": "m"}
            for pid in cat.ids for lid in (lm.coarse_ids[0], lm.fine_ids[0], colours["navy"])])
        resync_tag_sets(s, cat.ids)
    with read_connection(db_url) as conn:
        for plan, limit in (("walk", 1), ("sets", 1), ("auto", 7), ("capped", 5), ("sets", 57), ("walk", 56)):
            with pytest.MonkeyPatch.context() as mp:
                for knob, value in PLANS[plan].items():
                    mp.setattr(browse_mod, knob, value)
                for names in ([], ["tops"], ["tops", "navy"], ["t-shirt/top", "navy", "tops"]):
                    got = [i["product_id"] for i in _all_pages(conn, names, limit=limit)]
                    assert got == sorted(cat.ids), (plan, limit, names)
        assert all(i["score"] == 0.8 for i in browse_page(conn, ["navy"], limit=100)[0])


def test_browse_score_is_the_mean_of_the_published_tags(db_url, seed):
    cat = seed(db_url, 2)
    lm = cat.labels
    from sqlalchemy import insert

    from catalog.schema import ProductStyle

    with session_scope(db_url) as s:
        rows = [(cat.ids[0], lm.coarse_ids[0], 0.9, True), (cat.ids[0], lm.fine_ids[0], 0.6, True),
                (cat.ids[0], lm.fine_ids[6], 0.2, True),
                (cat.ids[0], lm.coarse_ids[1], 0.0, False),  # unpublished: not in the score, nor in the sets
                (cat.ids[1], lm.coarse_ids[0], 0.7, True)]
        s.execute(insert(ProductStyle.__table__), [
            {"product_id": p, "label_id": lid, "score": sc, "is_primary": False, "model_version": "m", "published": pub}
            for p, lid, sc, pub in rows])
        resync_tag_sets(s, cat.ids)
    with read_connection(db_url) as conn:
        items, _ = browse_page(conn, ["tops"])
        assert [(i["sku"], i["score"]) for i in items] == [("p00001", 0.7), ("p00000", round(1.7 / 3, 6))]
        assert browse_page(conn, ["bottoms"]) == ([], None)  # a known style nobody shows
        assert browse_page(conn, ["tops"], min_score=0.6)[0][0]["sku"] == "p00001"
    assert confidence_of([0.1, 0.2, 0.3]) == 0.2 and confidence_of([1 / 3]) == 0.333333


def test_a_taxonomy_change_is_seen_by_the_next_query(db_url, seed):
    """Names are matched in the statement: a second taxonomy with its own 'tops' label (a new id) is
    browsed and counted at once, after a first query that used the old one."""
    cat = seed(db_url, 4)
    lm = cat.labels
    from sqlalchemy import insert, text

    from catalog.schema import ProductStyle

    with session_scope(db_url) as s:
        s.execute(insert(ProductStyle.__table__), [
            {"product_id": pid, "label_id": lm.coarse_ids[0], "score": 0.9, "is_primary": True, "model_version": "m"}
            for pid in cat.ids[:2]])
        resync_tag_sets(s, cat.ids)
    with read_connection(db_url) as conn:
        assert browse(conn, ["tops"])["products"] == 2
        with session_scope(db_url) as s:
            new = s.execute(text("INSERT INTO style_labels (taxonomy, level, name, position) "
                                 "VALUES ('shop-v2', 'coarse', 'tops', 0) RETURNING id")).scalar()
            s.execute(insert(ProductStyle.__table__), [
                {"product_id": pid, "label_id": new, "score": 0.5, "is_primary": True, "model_version": "m2"}
                for pid in cat.ids[1:]])
            resync_tag_sets(s, cat.ids)
        got = browse(conn, ["tops"])
        assert got["products"] == 4 and [i["sku"] for i in got["items"]] == ["p00000", "p00001", "p00002", "p00003"]
        coarse = facets_within(conn, [])["facets"]["coarse"]
        assert {(f["taxonomy"], f["style"], f["count"]) for f in coarse} == {
            ("fashion-mnist", "tops", 2), ("shop-v2", "tops", 3)}


def test_bad_input_is_one_typed_error(catalog):
    with read_connection(catalog.url) as conn:
        with pytest.raises(NotFound, match="no style 'nope'"):
            browse(conn, ["tops", "nope"])
        with pytest.raises(NotFound, match="no style 'nope'"):
            facets_within(conn, ["nope"])
        with pytest.raises(NotFound):
            browse_page(conn, ["nope"])
        for bad in ("garbage!", "e30", "W10"):
            with pytest.raises(BadCursor):
                browse_page(conn, ["tops"], after=bad)
        for kwargs in ({"limit": 0}, {"limit": 1001}, {"min_score": float("nan")}, {"min_score": 1.5}):
            with pytest.raises(StyletagError):
                browse_page(conn, ["tops"], **kwargs)
        with pytest.raises(StyletagError, match="at most"):
            facets_within(conn, [f"s{i}" for i in range(9)])
        with pytest.raises(StyletagError, match="empty"):
            browse(conn, ["tops", " "])
        # the same name twice is one selected style; names with quotes are parameters, not SQL
        assert browse(conn, ["tops", "tops"])["products"] == browse(conn, ["tops"])["products"]
        with pytest.raises(NotFound):
            browse(conn, ["tops' OR '1'='1"])


def test_a_stale_cached_label_id_is_never_answered(catalog):
    """The ids of a name are cached per database; a cached id that now carries another name (a database
    re-created under the same URL) or a label added since (a new taxonomy) is noticed by the call's first
    statement, which looks again."""
    import catalog.browse as b

    with read_connection(catalog.url) as conn:
        for names in (["sneaker"], ["shoes", "navy"]):
            want_facets = facets_within(conn, names)
            want = browse(conn, names, limit=5)
            url = b._url(conn)
            for name in names:
                ids, generation = b._cache[(url, name)]
                for wrong in ((catalog.labels.fine_ids[5],), (10**9,)):  # another style's id; no such id
                    b._cache[(url, name)] = (wrong, generation)
                    assert browse(conn, names, limit=5) == want
                    assert b._cache[(url, name)] == (ids, generation)
                    b._cache[(url, name)] = (wrong, generation)
                    assert facets_within(conn, names) == want_facets
                    b._cache[(url, name)] = (wrong, generation)
                    assert browse_page(conn, names, limit=5) == (want["items"], want["next_cursor"])
                b._cache[(url, name)] = (ids, (generation[0] - 1, generation[1]))  # a label added since
                assert browse(conn, names, limit=5) == want
                assert b._cache[(url, name)] == (ids, generation)
