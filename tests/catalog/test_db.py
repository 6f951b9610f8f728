"""Engine options: STYLETAG_DB_PGBOUNCER turns off psycopg's server-side prepared statements, which a
PgBouncer older than 1.21 in transaction pooling mode cannot follow across server connections."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from catalog.db import make_engine
from catalog.errors import ConfigError
from catalog.settings import Settings


def _prepare_threshold(engine):
    with engine.connect() as conn:
        for _ in range(8):  # more than psycopg's default threshold of 5
            conn.execute(text("SELECT 1")).scalar_one()
        return conn.connection.driver_connection.prepare_threshold


def test_pgbouncer_flag_turns_off_prepared_statements(pg_base_url, monkeypatch):
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "1")
    engine = make_engine(pg_base_url + "/postgres")
    try:
        assert engine.dialect.driver == "psycopg"
        assert _prepare_threshold(engine) is None
        with engine.connect() as conn:
            # Nothing was prepared on the server by this session.
            assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one() == 0
    finally:
        engine.dispose()


def test_prepared_statements_stay_on_by_default(pg_base_url, monkeypatch):
    monkeypatch.delenv("STYLETAG_DB_PGBOUNCER", raising=False)
    engine = make_engine(pg_base_url + "/postgres")
    try:
        assert _prepare_threshold(engine) == 5
    finally:
        engine.dispose()
    # The keyword wins over the environment, and other connect_args are kept.
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "1")
    engine = make_engine(pg_base_url + "/postgres", pgbouncer=False, connect_args={"application_name": "t"})
    try:
        assert _prepare_threshold(engine) == 5
        with engine.connect() as conn:
            assert conn.execute(text("SHOW application_name")).scalar_one() == "t"
    finally:
        engine.dispose()


def test_pgbouncer_setting_is_validated(monkeypatch, tmp_path):
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path))
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "yes")
    assert Settings.from_env().db_pgbouncer is True
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "0")
    assert Settings.from_env().db_pgbouncer is False
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "maybe")
    with pytest.raises(ConfigError, match="STYLETAG_DB_PGBOUNCER"):
        Settings.from_env()


def test_sqlite_ignores_the_pgbouncer_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("STYLETAG_DB_PGBOUNCER", "1")
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
