"""Storefront queries on a catalog of 1,000,000 products with 4 tags each (synthetic rows, built once
with generate_series in the dedicated database ``styletag_bench_storefront`` and kept for later runs).

Through the storefront's Python API (``catalog.queries``), as the storefront calls it:
``find_by_style`` (a random style, min-score in [0.5, 0.95], limit 50) and ``tags_for_sku`` (a random
SKU); p50 / p95 over 1,000 calls each. Targets: p95 <= 5 ms and <= 2 ms. The plans (EXPLAIN ANALYZE
of the statements those calls send) must use the indexes, never a sequential scan of a big table.
"""

from __future__ import annotations

import random
import re
import time

from bench import common as C

NAME = "queries"
DB = "styletag_bench_storefront"


def build_catalog(n: int, db_name: str = DB) -> str:
    """``n`` products with 4 tags each (primary fine + its coarse parent, a runner-up of each level)."""
    from sqlalchemy import text

    from catalog.db import engine_for, session_scope
    from catalog.labels import sync_labels
    from catalog.models import register_model
    from model.taxonomy import load_taxonomy

    url = C.pg_database(db_name)
    with engine_for(url).connect() as conn:
        have = conn.execute(text("SELECT count(*) FROM products")).scalar()
        tags = conn.execute(text("SELECT count(*) FROM product_styles")).scalar()
    if have == n and tags == 4 * n:
        return url
    C.log(f"building {db_name}: {n} products x 4 tags (generate_series)")
    t0 = time.perf_counter()
    url = C.pg_database(db_name, fresh=True)  # a half-built one (interrupted load) starts over
    from datetime import UTC, datetime

    tax = load_taxonomy("fashion-mnist")
    with session_scope(url) as s:
        s.execute(text("TRUNCATE product_styles, style_truth, tag_state, tagging_runs, products RESTART IDENTITY "
                       "CASCADE"))
        labels = sync_labels(s, tax)
        register_model(s, "bench-storefront", datetime(2024, 1, 1, tzinfo=UTC), tax.name, "synthetic")
    fine = labels.fine_ids
    parent = [labels.coarse_ids[p[0]] for p in tax.parents]
    coarse = labels.coarse_ids
    pidx = [p[0] for p in tax.parents]
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
        conn.execute(
            f"""INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at)
            SELECT x.g, l.label_id, l.score, l.prim, 'bench-storefront', now()
            FROM (SELECT g, (g * 7919) % 10 AS f, ((g * 7919) % 10 + 1 + (g * 104729) % 9) % 10 AS f2,
                         0.5 + random() * 0.49 AS s1, random() * 0.3 AS s2
                  FROM generate_series(1, {int(n)}::bigint) g) x
            CROSS JOIN LATERAL (VALUES
                (({arr(fine)})[x.f + 1], x.s1, true),
                (({arr(parent)})[x.f + 1], x.s1 + 0.01, true),
                (({arr(fine)})[x.f2 + 1], x.s2, false),
                (({arr(coarse)})[(({arr(pidx)})[x.f + 1] + 1 + x.g % {nc - 1}) % {nc} + 1], x.s2 / 2, false)
            ) AS l(label_id, score, prim)
            """  # noqa: S608 - integers and label ids only
        )
        conn.execute("ALTER TABLE product_styles ADD CONSTRAINT pk_product_styles PRIMARY KEY (product_id, label_id)")
        conn.execute("CREATE INDEX ix_product_styles_storefront ON product_styles (label_id, score DESC, product_id)")
        conn.execute("SET session_replication_role = DEFAULT")
    with pg_raw(url) as conn:
        conn.execute("VACUUM ANALYZE products")
        conn.execute("VACUUM ANALYZE product_styles")
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


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    n = args.products or (20_000 if q else 1_000_000)
    nq = args.queries or (100 if q else 1000)
    db = f"{DB}_quick" if q else DB
    res = C.Result(NAME, "Storefront queries on a large catalog: latency and plans")
    res.parameters = {"products": n, "tags_per_product": 4, "queries_each": nq, "limit": 50,
                      "min_score": "uniform 0.5-0.95", "database": db,
                      "api": "catalog.queries over catalog.db.read_connection"}
    t0 = time.perf_counter()
    url = build_catalog(n, db)
    res.figures["build_seconds"] = round(time.perf_counter() - t0, 1)
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
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
