"""STYLETAG_DB_SCHEMA: styletag lives in its own PostgreSQL schema beside a shop's own ``products`` table.
``styletag db upgrade`` into such a database succeeds (it fails without the setting), styletag works there
(import, an inline retag with the shipped model), and the join of the shop's products to
``styletag.storefront_tags`` that docs/operations.md shows returns their tags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The query docs/operations.md shows (kept identical: the test checks the docs contain it).
JOIN_SQL = """SELECT p.sku, p.name, t.level, t.style, t.score
FROM public.products AS p
JOIN styletag.storefront_tags AS t ON t.sku = p.sku
WHERE t.is_primary
ORDER BY p.sku, t.level;"""


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def styletag(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_upgrade_beside_the_shops_own_products_table(pg_new_database, tmp_path):
    import psycopg

    url = pg_new_database()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("CREATE TABLE products (sku text PRIMARY KEY, name text NOT NULL, price numeric(10, 2))")
        conn.execute("INSERT INTO products VALUES ('SHOP-1', 'Blue sneaker', 79.00), ('SHOP-2', 'Grey coat', 199.00),"
                     " ('SHOP-3', 'Not in styletag', 5.00)")
    store = tmp_path / "images"
    store.mkdir()
    from catalog.importers.fashion_mnist import encode_image
    from model.fmnist import load_split

    images, _ = load_split("test")
    for i, sku in ((0, "SHOP-1"), (1, "SHOP-2")):
        (store / f"{sku}.png").write_bytes(encode_image(images[i], 28))
    env = {"STYLETAG_DATABASE_URL": url, "STYLETAG_HOME": str(tmp_path / "home"), "STYLETAG_STORE_URL": store.as_uri(),
           "STYLETAG_TORCH_THREADS": "1", "STYLETAG_FETCH_THREADS": "2"}

    plain = styletag(env, "db", "upgrade")  # the symptom of the issue: the shop's table is in the way
    assert plain.returncode != 0 and 'relation "products" already exists' in plain.stderr
    env["STYLETAG_DB_SCHEMA"] = "styletag"
    up = styletag(env, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert styletag(env, "db", "current").stdout.strip() == up.stdout.strip().rsplit(" ", 1)[-1]

    csv = tmp_path / "catalog.csv"
    csv.write_text("sku,title,image_uri\n" + "".join(f"{s},{s},{(store / f'{s}.png').as_uri()}\n"
                                                     for s in ("SHOP-1", "SHOP-2")))
    imp = styletag(env, "import", "catalog", str(csv))
    assert imp.returncode == 0 and "2 inserted" in imp.stdout, imp.stderr
    tag = styletag(env, "retag", "--all", "--inline")
    assert tag.returncode == 0, tag.stderr

    with psycopg.connect(_libpq(url)) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema IN ('public', 'styletag')")}
        assert "public.products" in tables and "styletag.products" in tables and "styletag.alembic_version" in tables
        assert "styletag.storefront_tags" in tables and "public.alembic_version" not in tables
        assert not tables - {"public.products"} - {t for t in tables if t.startswith("styletag.")}
        shop_rows = conn.execute("SELECT sku, name, price FROM public.products ORDER BY sku").fetchall()
        assert [r[0] for r in shop_rows] == ["SHOP-1", "SHOP-2", "SHOP-3"]  # the shop's table is untouched
        joined = conn.execute(JOIN_SQL).fetchall()
        role_ok = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'styletag_storefront') "
                               "OR has_schema_privilege('styletag_storefront', 'styletag', 'USAGE')").fetchone()[0]
    assert {r[0] for r in joined} == {"SHOP-1", "SHOP-2"}
    assert {(r[0], r[2]) for r in joined} == {(s, lv) for s in ("SHOP-1", "SHOP-2") for lv in ("coarse", "fine")}
    assert joined[0][1] == "Blue sneaker"
    assert role_ok
    assert JOIN_SQL in (ROOT / "docs" / "operations.md").read_text()
