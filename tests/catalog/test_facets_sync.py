"""Tag sets and counts (catalog.facets) stay exact after every kind of write, through the real paths: the tag
writer (a retag, a retag after a model rollback, a prediction held for review and its acceptance), a
person's override and its removal, an archive and a return, and a transaction rolled back. After each, the
stored sets, memberships and pair counts equal a recomputation from the published rows, and the drill-down
equals a brute force over the storefront view. Concurrent writers on PostgreSQL neither deadlock nor lose a
count; the migration fills the tables from existing rows; a full rebuild equals the incremental state."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from catalog.browse import browse_page, facets_within
from catalog.db import read_connection, session_scope
from catalog.facets import rebuild_tag_sets, resync_tag_sets
from catalog.models import activate, register_model
from catalog.models import rollback as model_rollback
from catalog.tags import ProductTags, Tag, write_batch
from tests.catalog import browse_helpers as bf


@pytest.fixture
def shop(db_url, seed):
    """40 products, the fashion-mnist labels with colours, model m1 active."""
    cat = seed(db_url, 40)
    with session_scope(db_url) as s:
        cat.colours = bf.add_colours(s)
        register_model(s, "m1", datetime(2025, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
    return cat


def _predictions(cat, ids, rng, review=()) -> list[ProductTags]:
    """A fine style with its coarse parent (primary), sometimes a runner-up, and a colour."""
    lm, out = cat.labels, []
    parents = {0: 0, 1: 1, 2: 0, 3: 2, 4: 3, 5: 5, 6: 0, 7: 5, 8: 4, 9: 5}  # fashion-mnist fine -> coarse
    colours = sorted(cat.colours.values())
    for pid in ids:
        fine = rng.randrange(10)
        score = rng.choice((0.55, 0.7, 0.9))
        tags = [Tag(lm.fine_ids[fine], score, True), Tag(lm.coarse_ids[parents[fine]], score, True),
                Tag(rng.choice(colours), rng.choice((0.6, 0.8)), False)]
        if rng.random() < 0.3:
            tags.append(Tag(lm.fine_ids[(fine + 1) % 10], 0.5, False))
        out.append(ProductTags(pid, "v1", tags, confidence=score,
                               review_reason="low_confidence" if pid in review else None))
    return out


def _exact(url, selections=((), ("tops",), ("shoes", "black"), ("navy",))) -> dict:
    with read_connection(url) as conn:
        bf.assert_exact(conn)
        products, pos = bf.shown(conn), bf.positions(conn)
        for names in selections:
            assert facets_within(conn, list(names)) == bf.facets(products, pos, list(names))
            assert [i["product_id"] for i in browse_page(conn, list(names), limit=1000)[0]] == bf.selection(
                products, names)
        return bf.stored(conn)


def test_counts_stay_exact_after_every_write(shop):
    from catalog.overrides import clear_tags, set_tag
    from catalog.review import accept

    url, rng, ids = shop.url, random.Random(5), shop.ids
    with session_scope(url) as s:
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids, rng), failed=[])
    _exact(url)
    with session_scope(url) as s:  # a retag of some products: sets move, scores change
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids[:15], rng), failed=[])
    _exact(url)

    with session_scope(url) as s:  # a person's correction replaces the model's fine (and coarse) tag
        set_tag(s, "p00003", level="fine", style="sneaker", by="test")
    after_override = _exact(url)
    with read_connection(url) as conn:
        assert "sneaker" in bf.shown(conn)[ids[3]].names
    with session_scope(url) as s:
        clear_tags(s, "p00003", level="fine")
    _exact(url)

    # a transaction rolled back (here: an error after the write) leaves the counts as they were
    before = _exact(url)
    with pytest.raises(RuntimeError), session_scope(url) as s:
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids, rng), failed=[])
        raise RuntimeError("the request failed after the write")
    assert _exact(url) == before
    assert before != after_override  # the comparison can fail: the override had changed the counts

    # model rollback: m2 activated and written, rolled back to m1, m1's tags written again
    with session_scope(url) as s:
        register_model(s, "m2", datetime(2025, 6, 1, tzinfo=UTC), "fashion-mnist", "resnet18")
        activate(s, "m2", by="test")
        write_batch(s, run_id=None, model_version="m2", tagged=_predictions(shop, ids, rng), failed=[])
    _exact(url)
    with session_scope(url) as s:
        model_rollback(s, by="test")
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids, rng), failed=[])
    _exact(url)

    held = set(ids[20:26])  # held for review: hidden, then accepted: shown
    with session_scope(url) as s:
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids[18:28], rng, review=held),
                    failed=[])
    with read_connection(url) as conn:
        assert not held & set(bf.shown(conn))
    _exact(url)
    with session_scope(url) as s:
        accept(s, [f"p{i:05d}" for i in range(20, 26)])
    with read_connection(url) as conn:
        assert held <= set(bf.shown(conn))
    _exact(url)


def test_counts_stay_exact_after_archive_and_return(shop):
    from catalog.products import archive_ids, republish

    url, rng, ids = shop.url, random.Random(6), shop.ids
    with session_scope(url) as s:
        write_batch(s, run_id=None, model_version="m1", tagged=_predictions(shop, ids, rng), failed=[])
        archive_ids(s, ids[:10])
    with read_connection(url) as conn:
        assert not set(ids[:10]) & set(bf.shown(conn))
        total = facets_within(conn, [])["products"]
    assert total == len(ids) - 10
    _exact(url)
    with session_scope(url) as s:
        s.execute(text("UPDATE products SET archived_at = NULL WHERE id <= :last"), {"last": ids[9]})
        republish(s, ids[:10])
    _exact(url)


def test_resync_is_idempotent_and_rebuild_equals_incremental(db_url, seed):
    cat = seed(db_url, 120)
    rng = random.Random(9)
    with session_scope(db_url) as s:
        bf.add_colours(s)
        bf.random_tags(s, cat.ids, rng)
        moved = resync_tag_sets(s, cat.ids)
        assert moved == len({pid for pid, in s.execute(text("SELECT DISTINCT product_id FROM product_styles "
                                                              "WHERE published"))})
        assert resync_tag_sets(s, cat.ids) == 0  # nothing changed: nothing moves
        # every tag of 5 products unpublished (those with a set leave it), a score of another halved (its
        # browse score changes, its set does not)
        had = {pid for pid, in s.execute(text("SELECT product_id FROM product_tag_sets WHERE product_id <= :p"),
                                         {"p": cat.ids[4]})}
        conf = s.execute(text("SELECT confidence FROM product_tag_sets WHERE product_id = :p"), {"p": cat.ids[50]})
        s.execute(text("UPDATE product_styles SET published = false WHERE product_id <= :p"), {"p": cat.ids[4]})
        s.execute(text("UPDATE product_styles SET score = score / 2 WHERE product_id = :p"), {"p": cat.ids[50]})
        assert had and resync_tag_sets(s, cat.ids[:60]) == len(had)
        assert s.execute(text("SELECT confidence FROM product_tag_sets WHERE product_id = :p"),
                         {"p": cat.ids[50]}).scalar() < conf.scalar()
    incremental = _exact(db_url)
    with session_scope(db_url) as s:
        assert rebuild_tag_sets(s) == len(incremental["members"])
    with read_connection(db_url) as conn:
        bf.assert_exact(conn)
        rebuilt = bf.stored(conn)
    assert rebuilt == incremental


def test_concurrent_writers_neither_deadlock_nor_lose_counts(pg_clean, seed):
    """Four writers resync batches of their own products moving between the same few sets at once (the
    counters' rows are shared by all of them): no deadlock, and the counts equal a recomputation."""
    cat = seed(pg_clean, 200)
    lm = cat.labels
    with session_scope(pg_clean) as s:
        bf.add_colours(s)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def writer(k: int) -> None:
        rng = random.Random(k)
        try:
            barrier.wait(timeout=30)
            for _ in range(8):  # each writer its own products (no lock shared there), the same counters
                batch = sorted(rng.sample(cat.ids[k::4], 30))
                with session_scope(pg_clean) as s:  # like the tag writer: its products locked first, in id order
                    s.execute(text("SELECT id FROM products WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"), {"ids": batch})
                    s.execute(text("DELETE FROM product_styles WHERE product_id = ANY(:ids)"), {"ids": batch})
                    s.execute(text(
                        "INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at) "
                        "SELECT u.id, :l1 + (u.id + :k) % 3, 0.5 + (u.id % 5) / 10.0, true, 'm', now() "
                        "FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) UNION ALL "
                        "SELECT u.id, :l2, 0.9, true, 'm', now() FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
                        "WHERE (u.id + :k) % 2 = 0"),
                        {"ids": batch, "k": k, "l1": lm.fine_ids[0], "l2": lm.coarse_ids[0]})
                    resync_tag_sets(s, batch)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    with read_connection(pg_clean) as conn:
        bf.assert_exact(conn)
        assert facets_within(conn, [])["products"] == len(bf.shown(conn)) > 0
