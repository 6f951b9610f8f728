"""Facet counts that stay exact on every write: products counted by their set of published labels.

A product's *tag set* is the set of labels of its published tag rows (``product_styles.published``, which
``catalog.publishing`` keeps: archived products, products held for review and model tags a person
overrode have none). Products with the same set are counted together (``tag_sets.products``), each set
lists its labels once (``tag_set_labels``), each product points at its set (``product_tag_sets``, with the
product's browse score) and ``label_pairs`` holds, for every two labels, how many products carry both
(label 0: every product; so it also holds the whole catalog's facets). A catalog of a million products has
a few thousand distinct sets, so "fine styles within tops and navy" is a sum over the sets that contain
both labels, and "within tops" one range of ``label_pairs``: never a scan of product rows
(``catalog.browse``).

Every path that changes which tags of some products are published calls :func:`resync_tag_sets` for those
products, last, in its own transaction (``catalog.publishing.refresh_published`` does). It recomputes the
products' sets from their published rows and moves their counts from the old set to the new one: a
rollback undoes the move with everything else. Concurrent writers never deadlock on the counters: the
products are locked first (id order), new sets are created in key order, and set and pair counters are
locked in key order, after everything else.

The browse score of a product (``product_tag_sets.confidence``) is the mean score of its published tags
(every level, primary and secondary), rounded to 6 decimals: one figure per product, the same whatever
the shopper selected, so that a selection is served in score order straight from an index.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import bindparam, delete, select, text, update
from sqlalchemy.orm import Session

from catalog.db import dialect_insert
from catalog.schema import ALL_PRODUCTS, LabelPair, Product, ProductStyle, ProductTagSet, TagSet, TagSetLabel

CHUNK = 1000  # ids per statement on SQLite (bound variables); PostgreSQL passes one array per PG_CHUNK
PG_CHUNK = 20_000
DECIMALS = 6


def confidence_of(scores: Iterable[float]) -> float:
    """The browse score of a product: the mean of its published tags' scores, rounded to 6 decimals
    (exact sum, so the figure does not depend on the order the rows came in)."""
    values = list(scores)
    return round(math.fsum(values) / len(values), DECIMALS)


def set_key(label_ids: Iterable[int]) -> str:
    """The canonical key of a set of labels: the ids in ascending order, comma-separated."""
    return ",".join(str(i) for i in sorted(set(label_ids)))


def key_labels(key: str) -> list[int]:
    return [int(x) for x in key.split(",")] if key else []


def _chunks(values: Sequence, size: int = CHUNK):
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _pg_array(values) -> str:
    return "{" + ",".join(map(repr, values)) + "}"


_PG_LOCK = text("SELECT p.id FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) JOIN products p ON p.id = u.id "
                "ORDER BY p.id FOR UPDATE OF p")
_PG_PUBLISHED = text("SELECT s.product_id, s.label_id, s.score FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
                     "JOIN product_styles s ON s.product_id = u.id WHERE s.published")
_PG_MEMBERS = text("SELECT m.product_id, m.set_id, m.confidence, t.key FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) "
                   "JOIN product_tag_sets m ON m.product_id = u.id JOIN tag_sets t ON t.id = m.set_id")
_PG_SETS_BY_KEY = text("SELECT t.id, t.key, t.products FROM unnest(CAST(:keys AS TEXT[])) AS u(key) "
                       "JOIN tag_sets t ON t.key = u.key")
# in key order, so that two writers creating the same new sets wait for each other in the same order
_PG_NEW_SETS = text("INSERT INTO tag_sets (key, products) SELECT u.key, 0 FROM unnest(CAST(:keys AS TEXT[])) "
                    "AS u(key) ORDER BY u.key ON CONFLICT (key) DO NOTHING RETURNING id, key")
_PG_NEW_LINKS = text("INSERT INTO tag_set_labels (set_id, label_id) SELECT u.sid, u.lid "
                     "FROM unnest(CAST(:sids AS BIGINT[]), CAST(:lids AS BIGINT[])) AS u(sid, lid) "
                     "ON CONFLICT DO NOTHING")
_PG_UPSERT_MEMBERS = text(
    "INSERT INTO product_tag_sets (product_id, set_id, confidence) SELECT u.pid, u.sid, u.conf "
    "FROM unnest(CAST(:pids AS BIGINT[]), CAST(:sids AS BIGINT[]), CAST(:confs AS DOUBLE PRECISION[])) "
    "AS u(pid, sid, conf) ON CONFLICT (product_id) DO UPDATE SET set_id = excluded.set_id, "
    "confidence = excluded.confidence"
)
_PG_DELETE_MEMBERS = text("DELETE FROM product_tag_sets m USING unnest(CAST(:ids AS BIGINT[])) AS u(id) "
                          "WHERE m.product_id = u.id")
# NO KEY UPDATE, not UPDATE: the memberships written just before hold KEY SHARE locks on their sets (the
# foreign key), and another writer's KEY SHARE on a set would block a FOR UPDATE out of id order: a deadlock.
_PG_LOCK_SETS = text("SELECT t.id FROM unnest(CAST(:ids AS BIGINT[])) AS u(id) JOIN tag_sets t ON t.id = u.id "
                     "ORDER BY t.id FOR NO KEY UPDATE OF t")
_PG_ADD_SETS = text("UPDATE tag_sets t SET products = t.products + u.d "
                    "FROM unnest(CAST(:ids AS BIGINT[]), CAST(:ds AS BIGINT[])) AS u(id, d) WHERE t.id = u.id")
_PG_NEW_PAIRS = text("INSERT INTO label_pairs (label_id, other_id, products) SELECT u.a, u.b, 0 "
                     "FROM unnest(CAST(:a AS BIGINT[]), CAST(:b AS BIGINT[])) AS u(a, b) "
                     "ORDER BY u.a, u.b ON CONFLICT (label_id, other_id) DO NOTHING")
_PG_LOCK_PAIRS = text("SELECT c.label_id FROM unnest(CAST(:a AS BIGINT[]), CAST(:b AS BIGINT[])) AS u(a, b) "
                      "JOIN label_pairs c ON c.label_id = u.a AND c.other_id = u.b "
                      "ORDER BY c.label_id, c.other_id FOR NO KEY UPDATE OF c")
_PG_ADD_PAIRS = text("UPDATE label_pairs c SET products = c.products + u.d FROM unnest(CAST(:a AS BIGINT[]), "
                     "CAST(:b AS BIGINT[]), CAST(:ds AS BIGINT[])) AS u(a, b, d) "
                     "WHERE c.label_id = u.a AND c.other_id = u.b")


def resync_tag_sets(session: Session, product_ids: Iterable[int]) -> int:
    """Recompute the tag sets of ``product_ids`` from their published rows, in the caller's transaction
    (call it last: it takes the counter locks). Returns how many products changed set (score changes
    alone are written too, and not counted)."""
    ids = sorted({int(p) for p in product_ids})
    if not ids:
        return 0
    pg = session.get_bind().dialect.name == "postgresql"
    tags: dict[int, list[tuple[int, float]]] = defaultdict(list)
    members: dict[int, tuple[int, float, str]] = {}
    for chunk in _chunks(ids, PG_CHUNK if pg else CHUNK):
        if pg:
            session.execute(_PG_LOCK, {"ids": _pg_array(chunk)})
            published = session.execute(_PG_PUBLISHED, {"ids": _pg_array(chunk)})
            current = session.execute(_PG_MEMBERS, {"ids": _pg_array(chunk)})
        else:  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
            published = session.execute(
                select(ProductStyle.product_id, ProductStyle.label_id, ProductStyle.score)
                .where(ProductStyle.product_id.in_(chunk), ProductStyle.published))
            current = session.execute(
                select(ProductTagSet.product_id, ProductTagSet.set_id, ProductTagSet.confidence, TagSet.key)
                .join(TagSet, TagSet.id == ProductTagSet.set_id).where(ProductTagSet.product_id.in_(chunk)))
        for pid, lid, score in published:
            tags[pid].append((lid, score))
        members.update({pid: (sid, conf, key) for pid, sid, conf, key in current})

    wanted: dict[int, tuple[str, float]] = {}  # product -> (key, confidence) where it differs from what is stored
    gone: list[int] = []  # products that lost every published tag
    set_delta: Counter[str] = Counter()  # by key
    moved = 0
    for pid in ids:
        have = members.get(pid)
        rows = tags.get(pid)
        if not rows:
            if have is not None:
                gone.append(pid)
                set_delta[have[2]] -= 1
                moved += 1
            continue
        key, conf = set_key(lid for lid, _ in rows), confidence_of(s for _, s in rows)
        if have is not None and have[2] == key and have[1] == conf:
            continue
        wanted[pid] = (key, conf)
        if have is None or have[2] != key:
            moved += 1
            set_delta[key] += 1
            if have is not None:
                set_delta[have[2]] -= 1
    if not wanted and not gone:
        return 0

    set_ids = _set_ids(session, sorted({k for k, _ in wanted.values()}), pg)
    set_ids.update({key: sid for sid, _, key in members.values()})
    if wanted:
        rows = [(pid, set_ids[key], conf) for pid, (key, conf) in sorted(wanted.items())]
        for chunk in _chunks(rows, PG_CHUNK if pg else CHUNK):
            if pg:
                pids, sids, confs = zip(*chunk, strict=True)
                session.execute(_PG_UPSERT_MEMBERS, {"pids": _pg_array(pids), "sids": _pg_array(sids),
                                                     "confs": _pg_array(confs)})
            else:
                ins = dialect_insert(session, ProductTagSet)
                session.execute(ins.on_conflict_do_update(
                    index_elements=["product_id"],
                    set_={"set_id": ins.excluded.set_id, "confidence": ins.excluded.confidence}),
                    [{"product_id": p, "set_id": s, "confidence": c} for p, s, c in chunk])
    for chunk in _chunks(gone, PG_CHUNK if pg else CHUNK):
        if pg:
            session.execute(_PG_DELETE_MEMBERS, {"ids": _pg_array(chunk)})
        else:
            session.execute(delete(ProductTagSet).where(ProductTagSet.product_id.in_(chunk)))

    set_delta = Counter({k: d for k, d in set_delta.items() if d})
    pair_delta: Counter[tuple[int, int]] = Counter()
    for key, d in set_delta.items():
        labels = [ALL_PRODUCTS, *key_labels(key)]
        for a in labels:
            for b in labels:
                pair_delta[(a, b)] += d
    _add(session, {set_ids[k]: d for k, d in set_delta.items()}, {k: d for k, d in pair_delta.items() if d}, pg)
    return moved


def _set_ids(session: Session, keys: list[str], pg: bool, retry: bool = True) -> dict[str, int]:
    """The ids of the sets ``keys`` (sorted), creating missing ones (with their labels) in key order."""
    found: dict[str, int] = {}
    # An empty set's labels are written again (no-ops, but a label removed by 'taxonomy apply' took its rows
    # with it, and SQLite may give a new label the removed one's id).
    created: dict[str, int] = {}
    for chunk in _chunks(keys, PG_CHUNK if pg else CHUNK):
        if pg:
            rows = session.execute(_PG_SETS_BY_KEY, {"keys": list(chunk)})
        else:
            rows = session.execute(select(TagSet.id, TagSet.key, TagSet.products).where(TagSet.key.in_(chunk)))
        for i, k, n in rows:
            found[k] = i
            if not n:
                created[k] = i
    missing = [k for k in keys if k not in found]
    for chunk in _chunks(missing, PG_CHUNK if pg else CHUNK):
        if pg:
            created.update({k: i for i, k in session.execute(_PG_NEW_SETS, {"keys": list(chunk)})})
        else:
            for k in chunk:  # one by one: SQLite's RETURNING of a multi-row insert has no defined order
                i = session.execute(dialect_insert(session, TagSet).values(key=k, products=0)
                                    .on_conflict_do_nothing().returning(TagSet.id)).scalar()
                if i is not None:
                    created[k] = i
    links = [(i, lid) for k, i in sorted(created.items()) for lid in key_labels(k)]
    for chunk in _chunks(links, PG_CHUNK if pg else CHUNK):
        if pg:
            sids, lids = zip(*chunk, strict=True)
            session.execute(_PG_NEW_LINKS, {"sids": _pg_array(sids), "lids": _pg_array(lids)})
        else:
            session.execute(dialect_insert(session, TagSetLabel).on_conflict_do_nothing(),
                            [{"set_id": i, "label_id": lid} for i, lid in chunk])
    found.update(created)
    still = [k for k in missing if k not in found]  # created meanwhile by a writer we waited for
    if still and retry:
        found.update(_set_ids(session, still, pg, retry=False))
    return found


def _add(session: Session, sets: dict[int, int], pairs: dict[tuple[int, int], int], pg: bool) -> None:
    """Add the deltas to the set and pair counters, each locked in key order (sets, then pairs)."""
    set_ids, keys = sorted(sets), sorted(pairs)
    if pg:
        if set_ids:
            session.execute(_PG_LOCK_SETS, {"ids": _pg_array(set_ids)})
            session.execute(_PG_ADD_SETS, {"ids": _pg_array(set_ids), "ds": _pg_array([sets[i] for i in set_ids])})
        if keys:
            ab = {"a": _pg_array([a for a, _ in keys]), "b": _pg_array([b for _, b in keys])}
            session.execute(_PG_NEW_PAIRS, ab)
            session.execute(_PG_LOCK_PAIRS, ab)
            session.execute(_PG_ADD_PAIRS, {**ab, "ds": _pg_array([pairs[k] for k in keys])})
        return
    ts, lp = TagSet.__table__, LabelPair.__table__
    if set_ids:
        session.connection().execute(
            update(ts).where(ts.c.id == bindparam("sid")).values(products=ts.c.products + bindparam("d")),
            [{"sid": i, "d": sets[i]} for i in set_ids])
    if keys:  # (a new row starts at 0: the CHECK would refuse a negative delta as an inserted value)
        session.execute(dialect_insert(session, LabelPair).on_conflict_do_nothing(),
                        [{"label_id": a, "other_id": b, "products": 0} for a, b in keys])
        session.connection().execute(
            update(lp).where(lp.c.label_id == bindparam("a"), lp.c.other_id == bindparam("b"))
            .values(products=lp.c.products + bindparam("d")),
            [{"a": a, "b": b, "d": pairs[(a, b)]} for a, b in keys])


# --- the whole catalog at once (the migration's fill, the bench's bulk load, a repair) -----------------

_PG_REBUILD = (
    "CREATE TEMP TABLE _product_keys ON COMMIT DROP AS "
    "SELECT product_id, string_agg(label_id::text, ',' ORDER BY label_id) AS key, "
    "round(avg(score)::numeric, 6)::double precision AS confidence FROM product_styles WHERE published "
    "GROUP BY product_id",
    "INSERT INTO tag_sets (key, products) SELECT key, count(*) FROM _product_keys GROUP BY key ORDER BY key",
    "INSERT INTO tag_set_labels (set_id, label_id) "
    "SELECT t.id, CAST(u.lid AS BIGINT) FROM tag_sets t CROSS JOIN LATERAL unnest(string_to_array(t.key, ',')) AS u(lid)",
    "INSERT INTO product_tag_sets (product_id, set_id, confidence) "
    "SELECT k.product_id, t.id, k.confidence FROM _product_keys k JOIN tag_sets t ON t.key = k.key",
    "INSERT INTO label_pairs (label_id, other_id, products) "
    "WITH l AS (SELECT set_id, label_id FROM tag_set_labels UNION ALL SELECT id, 0 FROM tag_sets) "
    "SELECT a.label_id, b.label_id, sum(t.products) FROM tag_sets t JOIN l a ON a.set_id = t.id "
    "JOIN l b ON b.set_id = t.id GROUP BY a.label_id, b.label_id",
)


def rebuild_tag_sets(session: Session) -> int:
    """Recompute every set and count from the published rows (empties the tables first). For a bulk load
    that bypassed the writers, or a repair after products were deleted by hand (deleting a product drops
    its set membership without counting it out; styletag itself archives, never deletes). Takes the
    tables' locks: writers wait. Returns the number of products with a set."""
    pg = session.get_bind().dialect.name == "postgresql"
    if pg:
        session.execute(text("TRUNCATE product_tag_sets, tag_set_labels, label_pairs, tag_sets"))
        for stmt in _PG_REBUILD:
            session.execute(text(stmt))
        return int(session.execute(text("SELECT products FROM label_pairs WHERE label_id = 0 AND other_id = 0"))
                   .scalar() or 0)
    for table in (ProductTagSet, TagSetLabel, LabelPair, TagSet):
        session.execute(delete(table))
    ids = list(session.scalars(select(Product.id).join(ProductStyle, ProductStyle.product_id == Product.id)
                               .where(ProductStyle.published).distinct().order_by(Product.id)))
    resync_tag_sets(session, ids)
    return len(ids)
