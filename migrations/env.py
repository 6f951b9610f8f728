"""Alembic environment. The URL comes from the caller, never from alembic.ini.

``catalog.migrate`` passes either an open connection (``config.attributes["connection"]``) or a
URL (``config.attributes["url"]``); run by hand, ``STYLETAG_DATABASE_URL`` (or the settings' default)
is used. Engines come from ``catalog.db.make_engine`` so SQLite gets the same pragmas as at run time.
"""

from __future__ import annotations

from alembic import context

from catalog.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url")
    if url:
        return url
    from catalog.settings import Settings

    return Settings.from_env().database_url


def _schema() -> str:
    """The PostgreSQL schema styletag lives in (``STYLETAG_DB_SCHEMA``, or what ``catalog.migrate`` passes)."""
    from catalog.settings import Settings

    return config.attributes.get("db_schema") or Settings.from_env().db_schema


def _create_schema(connection, schema: str, commit: bool = True) -> None:
    """Create styletag's schema before the first migration, so its tables, view and alembic_version land
    there (every connection's search_path is that schema alone) and never beside the shop's own tables."""
    if connection.dialect.name != "postgresql" or schema == "public":
        return
    from catalog.settings import _schema as checked

    connection.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{checked(schema)}"')
    if commit:  # our own connection; a caller's stays in the caller's transaction
        connection.commit()


def _configure(connection) -> None:
    schema = _schema()
    pg_schema = connection.dialect.name == "postgresql" and schema != "public"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode recreates tables for later revisions.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        version_table_schema=schema if pg_schema else None,
    )


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _create_schema(connection, _schema(), commit=False)
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from catalog.db import make_engine

    engine = make_engine(_url(), schema=_schema())
    try:
        with engine.connect() as conn:
            _create_schema(conn, _schema())
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Batch mode re-creates a table (copy, DROP, rename): with foreign keys on, dropping products
                # would cascade into every table that references it. Off for the migration (outside any
                # transaction, where SQLite honours it), checked and back on after.
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                raw = conn.connection.dbapi_connection
                broken = raw.execute("PRAGMA foreign_key_check").fetchall()
                raw.execute("PRAGMA foreign_keys=ON")
                if broken:
                    raise RuntimeError(f"migration left {len(broken)} rows with broken foreign keys: {broken[:3]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
