"""Migrations: upgrade head matches the models (no drift), downgrade drops everything, upgrade again
works; on PostgreSQL the storefront role reads the view and nothing else."""

from __future__ import annotations

import logging
import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from catalog import migrate
from catalog.db import make_engine
from catalog.schema import BROWSE_VIEWS, STOREFRONT_ROLE, STOREFRONT_VIEW, Base

TABLES = {"products", "style_labels", "label_parents", "models", "product_styles", "style_truth", "tagging_runs",
          "tag_state", "shadow_tags", "run_failure_counts", "tag_sets", "tag_set_labels", "product_tag_sets",
          "label_pairs"}


def _drift(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _inventory(url: str) -> tuple[set, set, set]:
    engine = make_engine(url)
    try:
        insp = inspect(engine)
        tables = set(insp.get_table_names()) - {"alembic_version"}
        indexes = {ix["name"] for t in tables for ix in insp.get_indexes(t)}
        return tables, set(insp.get_view_names()), indexes
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_new_database")()


def test_round_trip_without_drift(empty_url):
    assert migrate.current(empty_url) is None
    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == migrate.head() == "0003"
    assert _drift(empty_url) == []
    tables, views, indexes = _inventory(empty_url)
    assert tables == TABLES
    assert views == {STOREFRONT_VIEW, *BROWSE_VIEWS}
    assert {"ix_product_styles_storefront", "ix_tag_state_run_id_status", "ix_tagging_runs_kind_status"} <= indexes

    migrate.downgrade(empty_url, "base")
    assert migrate.current(empty_url) is None
    assert _inventory(empty_url)[:2] == (set(), set())

    migrate.upgrade(empty_url)
    assert migrate.current(empty_url) == "0003"
    assert _drift(empty_url) == []


def test_storefront_index_is_descending_on_score(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                ddl = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_product_styles_storefront'")).scalar()
            else:
                ddl = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_product_styles_storefront'")).scalar()
    finally:
        engine.dispose()
    assert "label_id, score DESC, product_id" in ddl


def _pg(url: str):
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True)


def test_storefront_role_reads_only_the_view(pg_clean):
    assert STOREFRONT_VIEW == "storefront_tags"
    with _pg(pg_clean) as conn:
        conn.execute("INSERT INTO products (sku, title, image_uri, created_at, updated_at) "
                     "VALUES ('s1', 't', 'file:///x', now(), now())")
        conn.execute(f'SET ROLE "{STOREFRONT_ROLE}"')
        assert conn.execute("SELECT count(*) FROM storefront_tags").fetchone() == (0,)
        refused = [
            "SELECT * FROM products",
            "SELECT * FROM product_styles",
            "SELECT * FROM tag_state",
            "INSERT INTO products (sku, title, image_uri, created_at, updated_at) VALUES ('x', '', '', now(), now())",
            "INSERT INTO storefront_tags (sku) VALUES ('x')",
            "DELETE FROM storefront_tags",
            "UPDATE products SET title = 'x'",
        ]
        for sql in refused:
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
        conn.execute("RESET ROLE")
        rolcanlogin = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (STOREFRONT_ROLE,)).fetchone()
        assert rolcanlogin == (False,)


def test_migrating_user_without_createrole_warns_and_continues(pg_base_url, pg_new_database, monkeypatch, caplog):
    """A user that may not create roles still gets the schema; the migration says so in one line."""
    url = pg_new_database()
    dbname = url.rsplit("/", 1)[1]
    user = f"styletag_mig_{uuid.uuid4().hex[:8]}"
    role = f"styletag_sf_{uuid.uuid4().hex[:8]}"  # a role name nobody created, so it must be created
    with _pg(f"{pg_base_url}/postgres") as admin:
        admin.execute(f'CREATE ROLE "{user}" LOGIN NOCREATEROLE')
        admin.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{user}"')
    try:
        with _pg(url) as conn:
            conn.execute(f'ALTER SCHEMA public OWNER TO "{user}"')
        limited = url.replace("://" + url.split("://", 1)[1].split("@", 1)[0] + "@", f"://{user}@", 1)
        with caplog.at_level(logging.WARNING):
            migrate.upgrade(limited, storefront_role=role)
        assert migrate.current(limited) == "0003"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and role in warnings[0] and "may not create roles" in warnings[0]
        migrate.downgrade(limited, storefront_role=role)
        assert migrate.current(limited) is None
    finally:
        make_engine(url).dispose()
        from catalog.db import engine_for

        engine_for(url).dispose()
        with _pg(f"{pg_base_url}/postgres") as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            admin.execute(f'DROP ROLE IF EXISTS "{user}"')


def test_0002_keeps_existing_data_both_ways(empty_url):
    """A catalog at 0001 with labels, a model, a product and its tags: 0002 moves the parent into
    label_parents, registers the model as a shadow, keeps every tag (published, source model) and lets a
    plain SQL insert leave the timestamps to the server; back to 0001 the parent is where it was."""
    migrate.upgrade(empty_url, "0001")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO style_labels (taxonomy, level, name, parent_id, position) "
                              "VALUES ('t', 'coarse', 'tops', NULL, 0)"))
            conn.execute(text("INSERT INTO style_labels (taxonomy, level, name, parent_id, position) "
                              "VALUES ('t', 'fine', 'shirt', 1, 0)"))
            conn.execute(text("INSERT INTO model_versions VALUES ('v1', '2025-01-01', 't', 'b', '2025-01-01')"))
            conn.execute(text("INSERT INTO products (sku, title, image_uri, image_version, created_at, updated_at) "
                              "VALUES ('a', 'A', 'file:///x.png', 'e1', '2025-01-01', '2025-01-01')"))
            conn.execute(text("INSERT INTO product_styles VALUES (1, 2, 0.75, :t, 'v1', '2025-01-01')"), {"t": True})
        migrate.upgrade(empty_url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT label_id, parent_id FROM label_parents")).all() == [(2, 1)]
            assert conn.execute(text("SELECT version, status FROM models")).all() == [("v1", "shadow")]
            row = conn.execute(text("SELECT score, source, published FROM product_styles")).one()
            assert (row[0], row[1], bool(row[2])) == (0.75, "model", True)
            assert conn.execute(text("SELECT sku, style FROM storefront_tags")).all() == [("a", "shirt")]
            conn.execute(text("INSERT INTO products (sku, image_uri) VALUES ('b', 'file:///y.png')"))
            title, created = conn.execute(text("SELECT title, created_at FROM products WHERE sku = 'b'")).one()
            assert title == "" and created is not None
        migrate.downgrade(empty_url, "0001")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT name, parent_id FROM style_labels ORDER BY id")).all() == [
                ("tops", None), ("shirt", 1)]
            assert conn.execute(text("SELECT count(*) FROM product_styles")).scalar() == 1
            assert conn.execute(text("SELECT version FROM model_versions")).all() == [("v1",)]
    finally:
        engine.dispose()
