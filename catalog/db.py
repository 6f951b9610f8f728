"""Engine and session factory from ``STYLETAG_DATABASE_URL``.

SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE`` so that
concurrent writers queue instead of failing with "database is locked" halfway through a batch.

PostgreSQL through psycopg 3: with ``STYLETAG_DB_PGBOUNCER=1`` psycopg never prepares a statement on the
server (``prepare_threshold=None``), which a PgBouncer older than 1.21 in transaction pooling mode needs
(newer ones track prepared statements with ``max_prepared_statements``; see docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from catalog.errors import ConfigError
from catalog.settings import Settings, redact_url
from catalog.settings import _schema as checked_schema  # the one identifier check (ConfigError when bad)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # pragma: no cover - exercised by every sqlite test
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":  # see read_connection
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _search_path(engine: Engine, schema: str) -> None:
    """Every new PostgreSQL connection looks up (and creates) unqualified names in ``schema`` only, so
    styletag's ``products`` never meets the shop's own ``public.products``. A session-level SET, committed
    at once so that no later rollback undoes it; first in line (``insert``), so that the dialect's own
    first-connect checks already see it (``default_schema_name``)."""

    @event.listens_for(engine, "connect", insert=True)
    def _connect(dbapi_conn, _record):
        with dbapi_conn.cursor() as cur:
            cur.execute(f'SET search_path TO "{schema}"')  # a validated identifier (Settings.db_schema)
        dbapi_conn.commit()


def make_engine(url: str, *, pgbouncer: bool | None = None, schema: str | None = None, **kwargs) -> Engine:
    """Create an engine; a malformed URL or missing driver is a ConfigError, not a traceback.

    ``pgbouncer`` (default: ``STYLETAG_DB_PGBOUNCER``) turns off server-side prepared statements of
    psycopg 3 (``connect_args={"prepare_threshold": None}``). ``schema`` (default: ``STYLETAG_DB_SCHEMA``)
    is the PostgreSQL schema styletag's tables live in: every connection's ``search_path``."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    try:
        if url.startswith("sqlite"):
            from pathlib import Path

            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, **kwargs)
            _sqlite_pragmas(engine)
            return engine
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 5)
        connect_args = {"connect_timeout": 10, **(kwargs.pop("connect_args", None) or {})}
        if pgbouncer is None or schema is None:
            env = Settings.from_env()
            pgbouncer = env.db_pgbouncer if pgbouncer is None else pgbouncer
            schema = env.db_schema if schema is None else schema
        if pgbouncer and url.startswith("postgresql+psycopg:"):
            connect_args["prepare_threshold"] = None
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        if schema != "public" and engine.dialect.name == "postgresql":
            _search_path(engine, checked_schema(schema))
        return engine
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as exc:
        why = "its database driver is not installed" if isinstance(exc, ImportError) else exc.__class__.__name__
        raise ConfigError(f"bad database URL {redact_url(url)!r}: {why}; use postgresql+psycopg://user@host/db "
                          "or sqlite:///path") from None


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine (and connection pool) per URL per process."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """The one place a unit of work is opened and committed (or rolled back)."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def read_connection(url: str) -> Iterator[Connection]:
    """A connection for read-only request handling (the storefront's ``catalog.queries`` calls), in
    autocommit mode: each query is one round trip, with no BEGIN / ROLLBACK around it and no transaction
    (or SQLite write lock) held between requests. Keep it open across requests."""
    with engine_for(url).connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


def dialect_insert(session: Session | Connection, table):
    """The dialect's INSERT (with ``on_conflict_do_nothing`` / ``on_conflict_do_update``) for ``table`` (a
    Table or a mapped class): the one place that knows which databases styletag supports."""
    from sqlalchemy.dialects import postgresql, sqlite

    bind = session.get_bind() if isinstance(session, Session) else session
    table = getattr(table, "__table__", table)
    name = bind.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ConfigError(f"unsupported database dialect {name!r}; use PostgreSQL or SQLite")
