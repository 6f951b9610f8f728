"""Storefront queries on a catalog of 1,000,000 products tagged at 3 levels (synthetic rows, built once with
generate_series in the dedicated database ``styletag_bench_storefront`` and kept for later runs): a primary
fine style and its coarse parent, a runner-up fine and a second coarse style (secondary tags), a colour
(skewed: black is common, purple rare) and for 30% of the products a second colour.

Through the storefront's Python API (``catalog.queries``), as the storefront calls it:
``find_by_style`` (a random style, min-score in [0.5, 0.95], limit 50) and ``tags_for_sku`` (a random
SKU); p50 / p95 over 1,000 calls each. Targets: p95 <= 5 ms and <= 2 ms. The plans (EXPLAIN ANALYZE
of the statements those calls send) must use the indexes, never a sequential scan of a big table.

Browse (``catalog.browse``, issue 17): a page of 50 products within two random styles (coarse x colour,
fine x colour, coarse x fine; pages 1 and 2), the facet counts within one or two random styles, and the
whole catalog's facets; p95 targets 5, 10 and 2 ms, plans checked the same way. Side by side, in the same
run, the naive SQL a storefront would otherwise write (``GROUP BY`` over the ``storefront_tags`` view),
whose answers must equal the fast path's.
"""

from __future__ import annotations

import random
import re
import time

from bench import common as C

NAME = "queries"
DB = "styletag_bench_storefront"


SECOND_COLOUR = "(x.g * 2246822519) % 1000 < 300"  # 30% of the products


def expected_tags(n: int) -> int:
    """Tag rows of the generated catalog: 5 per product, and a second colour for 30% of them."""
    return 5 * n + sum(1 for g in range(1, n + 1) if (g * 2246822519) % 1000 < 300)


def build_catalog(n: int, db_name: str = DB) -> str:
    """``n`` products with 5 or 6 tags at 3 levels (see the module docstring), and their tag sets."""
    from sqlalchemy import text

    from catalog.db import engine_for, session_scope
    from catalog.facets import rebuild_tag_sets
    from catalog.labels import sync_labels
    from catalog.models import register_model
    from model.colour import NAMES as COLOURS
    from model.taxonomy import load_taxonomy

    url = C.pg_database(db_name)
    with engine_for(url).connect() as conn:
        have = conn.execute(text("SELECT count(*) FROM products")).scalar()
        tags = conn.execute(text("SELECT count(*) FROM product_styles")).scalar()
        members = conn.execute(text("SELECT count(*) FROM product_tag_sets")).scalar()
    if have == n and tags == expected_tags(n) and members == n:
        return url
    C.log(f"building {db_name}: {n} products x 3 levels (generate_series)")
    t0 = time.perf_counter()
    url = C.pg_database(db_name, fresh=True)  # a half-built one (interrupted load) starts over
    from datetime import UTC, datetime

    tax = load_taxonomy("fashion-mnist")
    with session_scope(url) as s:
        s.execute(text("TRUNCATE product_styles, style_truth, tag_state, tagging_runs, products RESTART IDENTITY "
                       "CASCADE"))
        labels = sync_labels(s, tax)
        s.execute(text("INSERT INTO style_labels (taxonomy, level, name, position) VALUES (:t, 'colour', :n, :i) "
                       "ON CONFLICT DO NOTHING"), [{"t": tax.name, "n": c, "i": i} for i, c in enumerate(COLOURS)])
        colour = [s.execute(text("SELECT id FROM style_labels WHERE taxonomy = :t AND level = 'colour' AND name = :n"),
                            {"t": tax.name, "n": c}).scalar_one() for c in COLOURS]
        register_model(s, "bench-storefront", datetime(2024, 1, 1, tzinfo=UTC), tax.name, "synthetic")
    fine = labels.fine_ids
    parent = [labels.coarse_ids[p[0]] for p in tax.parents]
    coarse = labels.coarse_ids
    pidx = [p[0] for p in tax.parents]
    nk = len(colour)
    arr = lambda xs: "ARRAY[" + ",".join(map(str, xs)) + "]::bigint[]"  # noqa: E731
    with pg_raw(url) as conn:
        conn.execute("SET session_replication_role = replica")  # no FK triggers during the bulk load
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("ALTER TABLE product_styles DROP CONSTRAINT pk_product_styles")
        conn.execute("DROP INDEX ix_product_styles_storefront")
        conn.execute(
            "INSERT INTO products (id, sku, title, image_uri, image_version, created_at, updated_at) "
            "SELECT g, 'sku-' || lpad(g::text, 8, '0'), 'Product ' || g, 'file:///images/' || g || '.jpg', "
            "md5(g::text), now() - g * interval '1 second', now() FROM generate_series(1, %s::bigint) g", (int(n),)
        )
        conn.execute("SELECT setval(pg_get_serial_sequence('products', 'id'), %s::bigint)", (int(n),))
        conn.execute("SELECT setseed(0.42)")
        nc = len(coarse)
        # colour: floor(15 u^2) of a hash u in [0, 1): black 26% of the products, purple 3%
        conn.execute(
            f"""INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at)
            SELECT x.g, l.label_id, l.score, l.prim, 'bench-storefront', now()
            FROM (SELECT g, (g * 7919) % 10 AS f, ((g * 7919) % 10 + 1 + (g * 104729) % 9) % 10 AS f2,
                         floor({nk} * power(((g * 48271) % 10007) / 10007.0, 2))::int AS c1,
                         0.5 + random() * 0.49 AS s1, random() * 0.3 AS s2, 0.6 + random() * 0.39 AS s3
                  FROM generate_series(1, {int(n)}::bigint) g) x
            CROSS JOIN LATERAL (VALUES
                (({arr(fine)})[x.f + 1], x.s1, true),
                (({arr(parent)})[x.f + 1], x.s1 + 0.01, true),
                (({arr(fine)})[x.f2 + 1], x.s2, false),
                (({arr(coarse)})[(({arr(pidx)})[x.f + 1] + 1 + x.g % {nc - 1}) % {nc} + 1], x.s2 / 2, false),
                (({arr(colour)})[x.c1 + 1], x.s3, true),
                (CASE WHEN {SECOND_COLOUR} THEN ({arr(colour)})[(x.c1 + 1 + (x.g * 7) % {nk - 1}) % {nk} + 1] END,
                 x.s2 + 0.1, false)
            ) AS l(label_id, score, prim)
            WHERE l.label_id IS NOT NULL
            """  # noqa: S608 - integers and label ids only
        )
        conn.execute("ALTER TABLE product_styles ADD CONSTRAINT pk_product_styles PRIMARY KEY (product_id, label_id)")
        conn.execute("CREATE INDEX ix_product_styles_storefront ON product_styles (label_id, score DESC, product_id) "
                     "WHERE published")
        conn.execute("SET session_replication_role = DEFAULT")
    C.log(f"tags written in {time.perf_counter() - t0:.0f}s; counting tag sets")
    with session_scope(url) as s:
        rebuild_tag_sets(s)
    with pg_raw(url) as conn:
        for table in ("products", "product_styles", "tag_sets", "tag_set_labels", "product_tag_sets", "label_pairs"):
            conn.execute(f"VACUUM ANALYZE {table}")
    C.log(f"built in {time.perf_counter() - t0:.0f}s")
    return url


class pg_raw:  # noqa: N801 - a context manager
    def __init__(self, url: str):
        self.conn = C.pg_connect(url, autocommit=True)

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


def _capture(engine):
    """Record the statements (and parameters) that the storefront API sends."""
    from sqlalchemy import event

    seen: list[tuple[str, object]] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(engine, "before_cursor_execute", before)


def explain(url: str, call) -> list[dict]:
    from catalog.db import engine_for, session_scope

    engine = engine_for(url)
    seen, stop = _capture(engine)
    with session_scope(url) as s:
        call(s)
    stop()
    plans = []
    with engine.connect() as conn:
        for statement, params in seen:
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params).all()
            text_plan = "\n".join(r[0] for r in rows)
            seq = re.findall(r"Seq Scan on (\w+)", text_plan)
            plans.append({"statement": " ".join(statement.split()), "plan": text_plan,
                          "indexes": sorted(set(re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\w+)", text_plan))),
                          "seq_scans": seq})
    return plans


RAW_LABEL = "SELECT id FROM style_labels WHERE name = %s AND level = %s ORDER BY id"
RAW_FIND = (
    "SELECT s.product_id, s.score, s.is_primary, s.model_version, s.tagged_at, p.sku, p.title, p.image_uri, "
    "l.level, l.name FROM product_styles s JOIN products p ON p.id = s.product_id "
    "JOIN style_labels l ON l.id = s.label_id WHERE s.score >= %s AND s.label_id = %s "
    "ORDER BY s.score DESC, s.product_id LIMIT 51"
)
RAW_PRODUCT = "SELECT id, sku, title, image_uri FROM products WHERE sku = %s"
RAW_TAGS = (
    "SELECT l.level, l.name, s.score, s.is_primary, s.model_version, s.tagged_at FROM product_styles s "
    "JOIN style_labels l ON l.id = s.label_id WHERE s.product_id = %s "
    "ORDER BY s.is_primary DESC, s.score DESC, l.level, l.name"
)


def raw_sql_latency(url: str, finds, skus) -> tuple[list[float], list[float]]:
    """The same statements as the API, straight through psycopg (prepared): what the database costs,
    without the ORM's share of the latency."""
    lat_find, lat_tags = [], []
    with C.pg_connect(url, autocommit=True, prepare_threshold=0) as conn:
        for style, level, m in finds:
            t = time.perf_counter()
            (lid,) = conn.execute(RAW_LABEL, (style, level)).fetchone()
            conn.execute(RAW_FIND, (m, lid)).fetchall()
            lat_find.append((time.perf_counter() - t) * 1000)
        for sku in skus:
            t = time.perf_counter()
            pid = conn.execute(RAW_PRODUCT, (sku,)).fetchone()[0]
            conn.execute(RAW_TAGS, (pid,)).fetchall()
            lat_tags.append((time.perf_counter() - t) * 1000)
    return lat_find, lat_tags


# --- browse (issue 17): the drill-down on the tag sets, and the naive SQL over the view beside it --------

NAIVE_FACETS = (
    "WITH sel AS (SELECT product_id FROM storefront_tags WHERE style = ANY(%(styles)s) GROUP BY product_id "
    "HAVING count(DISTINCT style) = %(n)s) "
    "SELECT t.taxonomy, t.level, t.style, count(DISTINCT t.product_id) FROM storefront_tags t "
    "JOIN sel ON sel.product_id = t.product_id GROUP BY t.taxonomy, t.level, t.style"
)
NAIVE_CATALOG_FACETS = ("SELECT taxonomy, level, style, count(DISTINCT product_id) FROM storefront_tags "
                        "GROUP BY taxonomy, level, style")
NAIVE_PAGE = (
    "SELECT product_id, round(avg(score)::numeric, 6)::float8 AS score FROM storefront_tags GROUP BY product_id "
    "HAVING count(DISTINCT style) FILTER (WHERE style = ANY(%(styles)s)) = %(n)s "
    "ORDER BY score DESC, product_id LIMIT 50"
)
BIG = {"products", "product_styles", "product_tag_sets", "tag_set_labels"}


def _selections(conn, rnd: random.Random, k: int) -> tuple[list[list[str]], list[list[str]]]:
    """k random pairs (coarse x colour, fine x colour, coarse x fine) and k selections of one or two styles."""
    from sqlalchemy import text

    by: dict[str, list[str]] = {}
    for level, name in conn.execute(text("SELECT level, name FROM style_labels")):
        by.setdefault(level, []).append(name)
    kinds = [("coarse", "colour"), ("fine", "colour"), ("coarse", "fine")]
    pairs = [[rnd.choice(by[a]), rnd.choice(by[b])] for a, b in (rnd.choice(kinds) for _ in range(k))]
    some = [p if rnd.random() < 0.5 else [rnd.choice(by[rnd.choice(sorted(by))])] for p in pairs]
    rnd.shuffle(some)
    return pairs, some


def _timed(fn, items) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _naive_facets(raw, styles: list[str]) -> dict:
    rows = raw.execute(NAIVE_FACETS if styles else NAIVE_CATALOG_FACETS, {"styles": styles, "n": len(styles)})
    levels = ("fine", "colour") if styles else ("coarse", "fine", "colour")
    counts = {(t, lvl, s): n for t, lvl, s, n in rows if lvl in levels and s not in styles}
    return counts


def _fast_facets(result: dict) -> dict:
    return {(f["taxonomy"], lvl, f["style"]): f["count"] for lvl, items in result["facets"].items() for f in items}


def server_ms(url: str, calls: list) -> list[float]:
    """Per call, the database's own execution time of the statements it sent (EXPLAIN ANALYZE, timing
    off): what the queries cost the server, without the client, the network and the wait for a core."""
    from catalog.db import engine_for, read_connection

    engine = engine_for(url)
    out = []
    with read_connection(url) as conn:
        for call in calls:
            seen, stop = _capture(engine)
            try:
                call(conn)
            finally:
                stop()
            total = 0.0
            for statement, params in seen:
                plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF) " + statement, params).all()
                total += float(re.search(r"Execution Time: ([\d.]+)", plan[-1][0]).group(1))
            out.append(total)
    return out


def browse_figures(url: str, nq: int, res) -> None:
    import catalog.browse as B
    from catalog.browse import browse_page, facets_within
    from catalog.db import read_connection

    rnd = random.Random(17)
    with read_connection(url) as conn:
        pairs, some = _selections(conn, rnd, nq)
        for sel in pairs[:20] + some[:20]:  # warm: statement caches, prepared statements, label cache
            browse_page(conn, sel, limit=50)
            facets_within(conn, sel)
        cursors: dict[int, str] = {}

        def page1(i):
            items, cursors[i] = browse_page(conn, pairs[i], limit=50)

        lat_page1 = _timed(page1, range(nq))
        lat_page2 = _timed(lambda i: browse_page(conn, pairs[i], limit=50, after=cursors[i]),
                           [i for i in range(nq) if cursors.get(i)])
        lat_facets = _timed(lambda s: facets_within(conn, s), some)
        lat_catalog = _timed(lambda _: facets_within(conn, []), range(nq))
        # the plan choice against both plans forced, on the same selections (first pages)
        forced = {}
        sample = pairs[: max(20, nq // 5)]
        for plan, knobs in (("walk", {"SET_DESCENT_ROWS": 10**9}), ("sets", {"SET_DESCENT_ROWS": -(10**9)})):
            saved = {k: getattr(B, k) for k in knobs}
            for k, v in knobs.items():
                setattr(B, k, v)
            try:
                forced[plan] = _timed(lambda s: browse_page(conn, s, limit=50), sample)
            finally:
                for k, v in saved.items():
                    setattr(B, k, v)
        auto = _timed(lambda s: browse_page(conn, s, limit=50), sample)
    k = max(20, nq // 10)
    server = {"browse_page": server_ms(url, [lambda c, s=s: browse_page(c, s, limit=50) for s in pairs[:k]]),
              "facets_within": server_ms(url, [lambda c, s=s: facets_within(c, s) for s in some[:k]]),
              "catalog_facets": server_ms(url, [lambda c: facets_within(c, [])] * k)}
    with read_connection(url) as conn:
        # the naive SQL a storefront would write over the storefront_tags view, same selections, fewer runs
        k = 3 if nq < 500 else 5
        agree = True
        naive_page, naive_facets, naive_catalog = [], [], []
        with C.pg_connect(url, autocommit=True) as raw:
            for sel in pairs[:k]:
                t = time.perf_counter()
                ids = [r[0] for r in raw.execute(NAIVE_PAGE, {"styles": sel, "n": len(sel)})]
                naive_page.append((time.perf_counter() - t) * 1000)
                fast = browse_page(conn, sel, limit=50)[0]
                agree &= ids == [i["product_id"] for i in fast]
            for sel in some[:k]:
                t = time.perf_counter()
                counts = _naive_facets(raw, sel)
                naive_facets.append((time.perf_counter() - t) * 1000)
                agree &= counts == _fast_facets(facets_within(conn, sel))
            for _ in range(k):
                t = time.perf_counter()
                counts = _naive_facets(raw, [])
                naive_catalog.append((time.perf_counter() - t) * 1000)
            agree &= counts == _fast_facets(facets_within(conn, []))
            sets = raw.execute("SELECT count(*), count(*) FILTER (WHERE products > 0) FROM tag_sets").fetchone()
    lat_page = lat_page1 + lat_page2
    figures = {}
    for name, lat in (("browse_page_ms", lat_page), ("browse_page1_ms", lat_page1), ("browse_page2_ms", lat_page2),
                      ("facets_within_ms", lat_facets), ("catalog_facets_ms", lat_catalog),
                      ("naive_browse_page_ms", naive_page), ("naive_facets_within_ms", naive_facets),
                      ("naive_catalog_facets_ms", naive_catalog), ("forced_walk_ms", forced["walk"]),
                      ("forced_sets_ms", forced["sets"]), ("chosen_plan_ms", auto)):
        figures[name] = {"p50": C.pct(lat, 50), "p95": C.pct(lat, 95), "max": max(lat), "n": len(lat)}
    best = [min(w, s) for w, s in zip(forced["walk"], forced["sets"], strict=True)]
    figures["best_of_both_ms"] = {"p50": C.pct(best, 50), "p95": C.pct(best, 95), "n": len(best)}
    for name, lat in server.items():
        figures[f"server_{name}_ms"] = {"p50": C.pct(lat, 50), "p95": C.pct(lat, 95), "max": max(lat), "n": len(lat)}
    figures["tag_sets"] = {"all": sets[0], "with_products": sets[1]}
    style, two = pairs[0], next((s for s in some if len(s) == 1), ["tops"])
    plans = {
        "browse_page": explain(url, lambda s: browse_page(s, style, limit=50)),
        "browse_page_rare": explain(url, lambda s: browse_page(s, ["dresses", "purple"], limit=50)),
        "facets_within_one": explain(url, lambda s: facets_within(s, two)),
        "facets_within_two": explain(url, lambda s: facets_within(s, style)),
        "catalog_facets": explain(url, lambda s: facets_within(s, [])),
    }
    figures["plans"] = plans
    indexed = all(not (set(pl["seq_scans"]) & BIG) for v in plans.values() for pl in v)
    used = sorted({i for v in plans.values() for pl in v for i in pl["indexes"]})
    figures["indexes_used"] = used
    res.figures["browse"] = figures
    f = figures
    C.log(f"browse page p50 {f['browse_page_ms']['p50']:.2f} p95 {f['browse_page_ms']['p95']:.2f} ms; facets within "
          f"p95 {f['facets_within_ms']['p95']:.2f} ms; catalog facets p95 {f['catalog_facets_ms']['p95']:.2f} ms; "
          f"naive {f['naive_browse_page_ms']['p50']:.0f} / {f['naive_facets_within_ms']['p50']:.0f} / "
          f"{f['naive_catalog_facets_ms']['p50']:.0f} ms; answers agree: {agree}")

    def vs_naive(label, fast, naive, target, bound):
        value = f[fast]["p95"]
        res.checks.append(C.check(label, value, unit="ms", baseline=f[naive]["p50"], baseline_label="naive p50",
                                  ratio=f[naive]["p50"] / value if value else None, target=target, met=value <= bound))

    vs_naive("browse, two styles, pages 1-2, p95", "browse_page_ms", "naive_browse_page_ms", "<= 5 ms", 5)
    vs_naive("facets within 1-2 styles, p95", "facets_within_ms", "naive_facets_within_ms", "<= 10 ms", 10)
    vs_naive("whole catalog's facets, p95", "catalog_facets_ms", "naive_catalog_facets_ms", "<= 2 ms", 2)
    for name, label in (("browse_page", "browse page"), ("facets_within", "facets within"),
                        ("catalog_facets", "catalog facets")):
        res.checks.append(C.check(f"{label}: database execution time, p95", f[f"server_{name}_ms"]["p95"], unit="ms",
                                  baseline=f[f"server_{name}_ms"]["p50"], baseline_label="p50", target="(info)",
                                  met=None))
    res.checks.append(C.check("browse: chosen plan vs best of both forced, p95", f["chosen_plan_ms"]["p95"], unit="ms",
                              baseline=f["best_of_both_ms"]["p95"], baseline_label="best p95", target="(info)",
                              met=None))
    res.checks.append(C.check("browse answers = naive SQL over the view", float(agree), unit="bool",
                              target="equal", met=agree))
    res.checks.append(C.check("browse plans use the indexes", len(used), unit="indexes",
                              target="no seq scan of big tables", met=indexed))


def maintenance_figures(res, products: int = 20_480, batch: int = 1024) -> None:
    """What keeping the counts costs the tag writer: ``write_batch`` of ``batch`` products with and without
    the resync hook, on a fresh catalog (first write: every product gets a set; a retag: most move)."""
    from datetime import UTC, datetime

    from sqlalchemy import insert, text

    import catalog.publishing as publishing
    import catalog.tags as tags
    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.models import register_model
    from catalog.schema import Product
    from model.taxonomy import load_taxonomy

    url = C.pg_database("styletag_bench_browse_writes", fresh=True)
    tax = load_taxonomy("fashion-mnist")
    now = datetime.now(UTC)
    with session_scope(url) as s:
        labels = sync_labels(s, tax)
        s.execute(text("INSERT INTO style_labels (taxonomy, level, name, position) "
                       "SELECT :t, 'colour', 'c' || g, g FROM generate_series(0, 14) g"), {"t": tax.name})
        colours = [i for i, in s.execute(text("SELECT id FROM style_labels WHERE level = 'colour'"))]
        register_model(s, "bench-writes", datetime(2025, 1, 1, tzinfo=UTC), tax.name, "synthetic")
        s.execute(insert(Product.__table__), [{"sku": f"w{i}", "title": "", "image_uri": "file:///x.png",
                                               "image_version": "v", "created_at": now, "updated_at": now}
                                              for i in range(products)])
        ids = [i for i, in s.execute(text("SELECT id FROM products ORDER BY id"))]
    rng = random.Random(3)
    parents = [labels.coarse_ids[p[0]] for p in tax.parents]

    def predictions(chunk):
        out = []
        for pid in chunk:
            f, score = rng.randrange(10), rng.uniform(0.5, 1)
            out.append(tags.ProductTags(pid, "v", [tags.Tag(labels.fine_ids[f], score, True),
                                                   tags.Tag(parents[f], score, True),
                                                   tags.Tag(rng.choice(colours), 0.8, True)]))
        return out

    spent: list[float] = []

    def timed(session, pids):
        t = time.perf_counter()
        publishing.published_changed(session, pids)
        spent.append(time.perf_counter() - t)

    # Batches alternate with and without the hook (same table state, same load): a first write of every
    # product, then a retag that moves most of them to another set.
    figures = {}
    original = tags.published_changed
    try:
        for round_ in ("first_write", "retag"):
            lat: dict[bool, list[float]] = {True: [], False: []}
            for n, i in enumerate(range(0, len(ids), batch)):
                hooked = n % 2 == 0
                tags.published_changed = timed if hooked else (lambda session, pids: None)
                chunk = predictions(ids[i:i + batch])
                with session_scope(url) as s:
                    t = time.perf_counter()
                    tags.write_batch(s, run_id=None, model_version="bench-writes", tagged=chunk, failed=[])
                lat[hooked].append((time.perf_counter() - t) * 1000)
            figures[round_] = {"with_resync_batch_ms": sum(lat[True]) / len(lat[True]),
                               "without_resync_batch_ms": sum(lat[False]) / len(lat[False]),
                               "resync_ms": 1000 * sum(spent) / len(spent)}
            spent.clear()
    finally:
        tags.published_changed = original
    res.figures["browse_maintenance"] = {"products": products, "batch": batch, **figures}
    for round_, f in figures.items():
        C.log(f"{round_}: {batch}-product batches {f['with_resync_batch_ms']:.0f} ms with the resync hook "
              f"({f['resync_ms']:.0f} ms of it the resync), {f['without_resync_batch_ms']:.0f} ms without")
        res.checks.append(C.check(f"tag writer, {round_.replace('_', ' ')}: resync per {batch} products",
                                  f["resync_ms"], unit="ms", baseline=f["with_resync_batch_ms"],
                                  baseline_label="whole batch", ratio=f["resync_ms"] / f["with_resync_batch_ms"],
                                  target="(info)", met=None))


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--part", choices=("all", "find", "browse"), default="all",
                   help="find: find_by_style and tags_for_sku only; browse: catalog.browse only")
    args = p.parse_args(argv)
    q = args.quick
    n = args.products or (20_000 if q else 1_000_000)
    nq = args.queries or (100 if q else 1000)
    db = f"{DB}_quick" if q else DB
    res = C.Result(NAME, "Storefront queries on a large catalog: latency and plans")
    res.parameters = {"products": n, "levels": ["coarse", "fine", "colour"], "tags_per_product": "5 (6 for 30%)",
                      "queries_each": nq, "limit": 50, "min_score": "uniform 0.5-0.95 (find)", "database": db,
                      "api": "catalog.queries and catalog.browse over catalog.db.read_connection",
                      "browse_selections": "random pairs coarse x colour, fine x colour, coarse x fine (pages 1 "
                                           "and 2); facets within one or two random styles"}
    t0 = time.perf_counter()
    url = build_catalog(n, db)
    res.figures["build_seconds"] = round(time.perf_counter() - t0, 1)
    res.parameters["part"] = args.part
    if args.part in ("all", "find"):
        find_figures(url, n, nq, res)
    if args.part in ("all", "browse"):
        browse_figures(url, nq, res)
        maintenance_figures(res, products=4096 if q else 20_480)
    res.write(q)
    return 0


def find_figures(url: str, n: int, nq: int, res) -> None:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.queries import find_by_style, tags_for_sku
    from catalog.schema import StyleLabel

    with session_scope(url) as s:
        styles = [(r.name, r.level) for r in s.execute(select(StyleLabel.name, StyleLabel.level))]
    rnd = random.Random(7)
    finds = [(*rnd.choice(styles), round(rnd.uniform(0.5, 0.95), 3)) for _ in range(nq)]
    skus = [f"sku-{rnd.randint(1, n):08d}" for _ in range(nq)]
    lat_find, lat_tags, rows_found = [], [], []
    # A storefront keeps its connection open: catalog.db.read_connection (autocommit, no BEGIN/ROLLBACK
    # per request). The Session path (a unit of work per request) is measured too, for comparison.
    from catalog.db import read_connection

    with read_connection(url) as conn:
        for style, level, m in finds[:20]:  # warm the connection, the statement caches and the label cache
            find_by_style(conn, style, level=level, min_score=m, limit=50)
        for style, level, m in finds:
            t = time.perf_counter()
            items, _ = find_by_style(conn, style, level=level, min_score=m, limit=50)
            lat_find.append((time.perf_counter() - t) * 1000)
            rows_found.append(len(items))
        for sku in skus:
            t = time.perf_counter()
            tags_for_sku(conn, sku)
            lat_tags.append((time.perf_counter() - t) * 1000)
    sess_find, sess_tags = [], []
    with session_scope(url) as s:
        for style, level, m in finds:
            t = time.perf_counter()
            find_by_style(s, style, level=level, min_score=m, limit=50)
            s.rollback()  # end the read transaction, as a request would
            sess_find.append((time.perf_counter() - t) * 1000)
        for sku in skus:
            t = time.perf_counter()
            tags_for_sku(s, sku)
            s.rollback()
            sess_tags.append((time.perf_counter() - t) * 1000)
    raw_find, raw_tags = raw_sql_latency(url, finds, skus)
    f50, f95, t50, t95 = C.pct(lat_find, 50), C.pct(lat_find, 95), C.pct(lat_tags, 50), C.pct(lat_tags, 95)
    res.figures.update({"find_ms": {"p50": f50, "p95": f95, "max": max(lat_find)},
                        "tags_ms": {"p50": t50, "p95": t95, "max": max(lat_tags)},
                        "find_rows_mean": sum(rows_found) / len(rows_found),
                        "session_find_ms": {"p50": C.pct(sess_find, 50), "p95": C.pct(sess_find, 95)},
                        "session_tags_ms": {"p50": C.pct(sess_tags, 50), "p95": C.pct(sess_tags, 95)},
                        "raw_sql_find_ms": {"p50": C.pct(raw_find, 50), "p95": C.pct(raw_find, 95)},
                        "raw_sql_tags_ms": {"p50": C.pct(raw_tags, 50), "p95": C.pct(raw_tags, 95)}})
    style, level, m = finds[0]
    plans = {"find_by_style": explain(url, lambda s: find_by_style(s, style, level=level, min_score=m, limit=50)),
             "tags_for_sku": explain(url, lambda s: tags_for_sku(s, skus[0]))}
    big = {"products", "product_styles"}
    res.figures["plans"] = plans
    indexed = all(not (set(pl["seq_scans"]) & big) for v in plans.values() for pl in v)
    used = sorted({i for v in plans.values() for pl in v for i in pl["indexes"]})
    res.figures["indexes_used"] = used
    C.log(f"find p50 {f50:.2f} p95 {f95:.2f} ms; tags p50 {t50:.2f} p95 {t95:.2f} ms; indexes {used}")
    res.checks.append(C.check("find_by_style p95", f95, unit="ms", baseline=f50, baseline_label="p50",
                              target="<= 5 ms", met=f95 <= 5))
    res.checks.append(C.check("tags_for_sku p95", t95, unit="ms", baseline=t50, baseline_label="p50",
                              target="<= 2 ms", met=t95 <= 2))
    res.checks.append(C.check("find via a Session per request, p95", C.pct(sess_find, 95), unit="ms",
                              baseline=C.pct(sess_find, 50), baseline_label="p50", target="(info)", met=None))
    res.checks.append(C.check("tags via a Session per request, p95", C.pct(sess_tags, 95), unit="ms",
                              baseline=C.pct(sess_tags, 50), baseline_label="p50", target="(info)", met=None))
    res.checks.append(C.check("find, same SQL via psycopg, p95", C.pct(raw_find, 95), unit="ms",
                              baseline=C.pct(raw_find, 50), baseline_label="p50", target="(info)", met=None))
    res.checks.append(C.check("tags, same SQL via psycopg, p95", C.pct(raw_tags, 95), unit="ms",
                              baseline=C.pct(raw_tags, 50), baseline_label="p50", target="(info)", met=None))
    res.checks.append(C.check("plans use the indexes", len(used), unit="indexes", target="no seq scan of big tables",
                              met=indexed and "ix_product_styles_storefront" in used))


if __name__ == "__main__":
    raise SystemExit(main())
