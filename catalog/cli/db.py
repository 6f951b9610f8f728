"""``styletag db``: create or migrate the catalog schema (Alembic)."""

from __future__ import annotations

import click

from catalog.cli import current_settings


@click.group("db")
def db() -> None:
    """Create or migrate the catalog schema (Alembic)."""


def _migrate(direction: str, revision: str) -> None:
    """Run ``catalog.migrate.<direction>`` on STYLETAG_DATABASE_URL and say where the catalog now is."""
    from catalog import migrate
    from catalog.settings import redact_url

    url = current_settings().database_url
    getattr(migrate, direction)(url, revision)
    click.echo(f"{redact_url(url)}: at revision {migrate.current(url) or 'base'}")


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Migrate the catalog at STYLETAG_DATABASE_URL up to REVISION."""
    _migrate("upgrade", revision)


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True, help="Target revision (base drops everything).")
def db_downgrade(revision: str) -> None:
    """Migrate the catalog down to REVISION."""
    _migrate("downgrade", revision)


@db.command("current")
def db_current() -> None:
    """Print the catalog's schema revision ('base' when not migrated)."""
    from catalog.migrate import current

    click.echo(current(current_settings().database_url) or "base")
