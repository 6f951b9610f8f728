"""Issue 6, item 11: the storefront role reads the storefront view and nothing else (PostgreSQL).

Extends tests/catalog/test_migrations.py::test_storefront_role_reads_only_the_view (a sample of
statements) to the full matrix: SELECT / INSERT / UPDATE / DELETE / TRUNCATE on every base table of the
schema (found in the catalog, not listed by hand), every sequence, writes through the view, and DDL.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors, sql

from catalog.schema import BROWSE_VIEWS, STOREFRONT_ROLE, STOREFRONT_VIEW
from tests.conftest import _libpq


def _connect(sec_db):
    from sqlalchemy.engine import make_url

    url = make_url(sec_db.admin_url)
    base = sec_db.admin_url.rsplit("/", 1)[0]
    return psycopg.connect(_libpq(base, url.database), autocommit=True)


@pytest.fixture
def probe(sec_db):
    """A product with one tag, so that the view has a row to show; removed afterwards."""
    with _connect(sec_db) as conn:
        pid = conn.execute("INSERT INTO products (sku, title, image_uri, image_version, created_at, updated_at) "
                           "VALUES ('sf-probe', 't', 'file:///x.png', 'v1', now(), now()) RETURNING id").fetchone()[0]
        label = conn.execute("SELECT min(id) FROM style_labels WHERE level = 'fine'").fetchone()[0]
        conn.execute("INSERT INTO product_styles (product_id, label_id, score, is_primary, model_version, tagged_at) "
                     "VALUES (%s, %s, 0.9, true, 'm', now())", (pid, label))
    yield pid
    with _connect(sec_db) as conn:
        conn.execute("DELETE FROM products WHERE id = %s", (pid,))


def _counts(conn, tables) -> dict[str, int]:
    return {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0] for t in tables}


def test_storefront_role_reads_the_view_and_nothing_else(sec_db, probe):
    with _connect(sec_db) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE' ORDER BY table_name")]
        assert {"products", "product_styles", "style_labels", "style_truth", "tag_state", "tagging_runs",
                "models", "label_parents", "shadow_tags", "alembic_version"} <= set(tables)
        first_column = dict(conn.execute(
            "SELECT table_name, min(column_name) FROM information_schema.columns "
            "WHERE table_schema = current_schema() GROUP BY table_name").fetchall())
        sequences = [r[0] for r in conn.execute(
            "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = current_schema()")]
        assert sequences  # products.id, style_labels.id, tagging_runs.id
        before = _counts(conn, tables)

        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(STOREFRONT_ROLE)))
        rows = conn.execute(f"SELECT sku, level, style, score, is_primary FROM {STOREFRONT_VIEW} "  # noqa: S608
                            "WHERE sku = 'sf-probe'").fetchall()
        assert rows == [("sf-probe", "fine", rows[0][2], 0.9, True)]

        refused: list[str] = []
        for table in tables:
            t, col = sql.Identifier(table), sql.Identifier(first_column[table])
            for stmt in (
                sql.SQL("SELECT * FROM {} LIMIT 1").format(t),
                sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
                sql.SQL("UPDATE {} SET {} = {}").format(t, col, col),
                sql.SQL("DELETE FROM {}").format(t),
                sql.SQL("TRUNCATE {} CASCADE").format(t),
                sql.SQL("COPY {} TO STDOUT").format(t),
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(stmt)
                refused.append(stmt.as_string(conn))
        for seq in sequences:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT nextval(%s)", (seq,))
            refused.append(f"nextval({seq})")
        view = sql.Identifier(STOREFRONT_VIEW)
        for stmt in (  # a join view is not updatable anyway; the privilege check below holds regardless
            sql.SQL("INSERT INTO {} (sku) VALUES ('x')").format(view),
            sql.SQL("UPDATE {} SET score = 0").format(view),
            sql.SQL("DELETE FROM {}").format(view),
        ):
            with pytest.raises((errors.InsufficientPrivilege, errors.ObjectNotInPrerequisiteState)):
                conn.execute(stmt)
            refused.append(stmt.as_string(conn))
        for stmt in (
            sql.SQL("CREATE TABLE sf_probe (x int)"),
            sql.SQL("CREATE VIEW sf_probe AS SELECT 1"),
            sql.SQL("GRANT SELECT ON products TO {}").format(sql.Identifier(STOREFRONT_ROLE)),
            sql.SQL("SELECT pg_read_file('/etc/hostname')"),
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(stmt)
            refused.append(stmt.as_string(conn))
        with pytest.raises(psycopg.Error):  # not even a privilege question: a view cannot be truncated
            conn.execute(sql.SQL("TRUNCATE {}").format(view))
        print(f"{len(refused)} statements refused to {STOREFRONT_ROLE} over {len(tables)} tables, "
              f"{len(sequences)} sequences and the view")

        conn.execute("RESET ROLE")
        privileges = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
        granted = {(obj, p) for obj in [*tables, STOREFRONT_VIEW, *BROWSE_VIEWS] for p in privileges
                   if conn.execute("SELECT has_table_privilege(%s, %s, %s)", (STOREFRONT_ROLE, obj, p)).fetchone()[0]}
        assert granted == {(view, "SELECT") for view in (STOREFRONT_VIEW, *BROWSE_VIEWS)}  # browse: migration 0003
        assert _counts(conn, tables) == before  # nothing was written, whatever the errors said
        assert conn.execute("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                            "WHERE rolname = %s", (STOREFRONT_ROLE,)).fetchone() == (False, False, False, False)
