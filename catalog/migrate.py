"""Run the Alembic migrations programmatically (``styletag db upgrade`` and the test fixtures).

The script location is the installed ``migrations`` package, so this works from an editable install
and from any working directory; the URL is passed in memory (never through alembic.ini, whose
``%`` interpolation would also mangle percent-encoded passwords).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import OperationalError

import migrations
from catalog.db import make_engine
from catalog.errors import ServiceUnavailable
from catalog.settings import redact_url

# ``__path__`` rather than ``__file__``: an editable install made before migrations/__init__.py existed
# maps the package as a namespace package, which has no ``__file__``.
MIGRATIONS_DIR = Path(next(iter(migrations.__path__))).resolve()


def alembic_config(url: str, **attributes) -> Config:
    """An Alembic Config for ``url`` that needs no ini file; ``attributes`` reach the migrations
    (``storefront_role``: the read-only role's name)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    cfg.attributes.update({k: v for k, v in attributes.items() if v is not None})
    return cfg


def _run(url: str, fn, revision: str, **attributes) -> None:
    try:
        fn(alembic_config(url, **attributes), revision)
    except OperationalError as exc:
        raise ServiceUnavailable(
            f"cannot migrate {redact_url(url)}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None


def upgrade(url: str, revision: str = "head", *, storefront_role: str | None = None) -> None:
    """Bring the schema at ``url`` up to ``revision`` (default: the newest)."""
    _run(url, command.upgrade, revision, storefront_role=storefront_role)


def downgrade(url: str, revision: str = "base", *, storefront_role: str | None = None) -> None:
    """Take the schema at ``url`` down to ``revision`` (default: drop everything)."""
    _run(url, command.downgrade, revision, storefront_role=storefront_role)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None for an empty (unmigrated) database."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise ServiceUnavailable(
            f"cannot reach {redact_url(url)}: {str(exc.orig).strip().splitlines()[0]}"
        ) from None
    finally:
        engine.dispose()


def head() -> str | None:
    """The newest revision shipped with this package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
