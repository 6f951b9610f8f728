"""The read-only storefront role serves the drill-down (PostgreSQL): catalog.browse runs as the role with
the same answers as the owner's, and every SQL statement of docs/operations.md "The SQL a storefront
developer writes" runs as the role and equals the Python API and a brute force over storefront_tags."""

from __future__ import annotations

import random
import re
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from catalog.browse import browse, browse_page, facets_within
from catalog.db import make_engine, read_connection, session_scope
from catalog.facets import resync_tag_sets
from catalog.schema import BROWSE_VIEWS, STOREFRONT_ROLE
from tests.catalog import browse_helpers as bf

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def doc_statements() -> dict[str, str]:
    """The named ```sql blocks of the section (``-- name: X`` on their first line)."""
    doc = DOC.read_text()
    section = doc.split("## The SQL a storefront developer writes", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    return {re.match(r"-- name: (\w+)", b).group(1): b for b in blocks if b.startswith("-- name:")}


@pytest.fixture
def shop(pg_clean, seed):
    cat = seed(pg_clean, 150)
    with session_scope(pg_clean) as s:
        bf.add_colours(s)
        bf.random_tags(s, cat.ids, random.Random(11))
        resync_tag_sets(s, cat.ids)
    return cat


def _as_role(url: str):
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True)


def _counts(rows) -> dict:
    return {(t, lvl, s): n for t, lvl, s, n in rows}


def test_the_role_runs_catalog_browse(shop):
    selections = ([], ["tops"], ["tops", "navy"], ["sneaker", "black"])
    with read_connection(shop.url) as conn:
        want = [(browse(conn, s, limit=2), facets_within(conn, s, min_score=0.6)) for s in selections]
    engine = make_engine(shop.url)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(f'SET ROLE "{STOREFRONT_ROLE}"'))
            with pytest.raises(Exception, match="permission denied"):
                conn.execute(text("SELECT count(*) FROM product_tag_sets"))
            got = [(browse(conn, s, limit=2), facets_within(conn, s, min_score=0.6)) for s in selections]
            cursor = got[2][0]["next_cursor"]
            second = browse_page(conn, ["tops", "navy"], limit=2, after=cursor)
            conn.execute(text("RESET ROLE"))
        with read_connection(shop.url) as owner:
            assert second == browse_page(owner, ["tops", "navy"], limit=2, after=cursor)
    finally:
        engine.dispose()
    assert got == want and want[2][0]["products"] > 2 and second[0]


def test_the_documented_sql_runs_as_the_role_and_agrees(shop):
    statements = doc_statements()
    assert set(statements) == {"catalog_facets", "within_one", "within_many", "page", "page_rare", "naive_within"}
    with read_connection(shop.url) as conn:
        shown, pos = bf.shown(conn), bf.positions(conn)
        api_page = browse_page(conn, ["tops", "navy"], limit=50)[0]
    with _as_role(shop.url) as conn:
        conn.execute(f'SET ROLE "{STOREFRONT_ROLE}"')
        run = lambda name, **p: conn.execute(statements[name], p).fetchall()  # noqa: E731

        every = bf.facets(shown, pos, [])["facets"]
        assert _counts(run("catalog_facets")) == {("fashion-mnist", lvl, f["style"]): f["count"]
                                                  for lvl, items in every.items() for f in items}
        for names in (["tops"], ["tops", "navy"], ["navy"], ["sneaker", "black", "shoes"]):
            brute = {}
            chosen = bf.selection(shown, names)
            for pid in chosen:
                for label in shown[pid].labels:
                    if label[2] not in names:
                        brute[label] = brute.get(label, 0) + 1
            assert _counts(run("within_many", styles=names)) == brute
            assert _counts(run("naive_within", styles=names)) == brute
            if len(names) == 1:
                assert _counts(run("within_one", style=names[0])) == brute
            first = run("page", styles=names, score=2.0, product_id=0)
            assert [r[0] for r in first] == chosen[:50] == [r[0] for r in run("page_rare", styles=names, score=2.0,
                                                                             product_id=0)]
            if len(first) > 10:  # the next page after the 10th row
                after = {"score": first[9][3], "product_id": first[9][0]}
                assert [r[0] for r in run("page", styles=names, **after)] == chosen[10:60]
                assert [r[0] for r in run("page_rare", styles=names, **after)] == chosen[10:60]
        assert [r[0] for r in run("page", styles=["tops", "navy"], score=2.0, product_id=0)] == [
            i["product_id"] for i in api_page]


def test_the_role_may_read_the_browse_views_and_write_nothing(shop):
    with _as_role(shop.url) as conn:
        conn.execute(f'SET ROLE "{STOREFRONT_ROLE}"')
        for view in BROWSE_VIEWS:
            assert conn.execute(f"SELECT count(*) FROM {view}").fetchone()[0] > 0  # noqa: S608 - fixed names
            with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectNotInPrerequisiteState)):
                conn.execute(f"DELETE FROM {view}")  # noqa: S608 - fixed names
        for table in ("tag_sets", "tag_set_labels", "product_tag_sets", "label_pairs"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT 1 FROM {table} LIMIT 1")  # noqa: S608 - fixed names
