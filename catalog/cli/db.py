"""``styletag db``: create or migrate the catalog schema (Alembic)."""

from __future__ import annotations

import click

from catalog.cli import current_settings

# --- db ---------------------------------------------------------------------------------------------


@click.group("db")
def db() -> None:
    """Create or migrate the catalog schema (Alembic)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Migrate the catalog at STYLETAG_DATABASE_URL up to REVISION."""
    from catalog.migrate import current, upgrade
    from catalog.settings import redact_url

    url = current_settings().database_url
    upgrade(url, revision)
    click.echo(f"{redact_url(url)}: at revision {current(url) or 'base'}")


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True, help="Target revision (base drops everything).")
def db_downgrade(revision: str) -> None:
    """Migrate the catalog down to REVISION."""
    from catalog.migrate import current, downgrade
    from catalog.settings import redact_url

    url = current_settings().database_url
    downgrade(url, revision)
    click.echo(f"{redact_url(url)}: at revision {current(url) or 'base'}")


@db.command("current")
def db_current() -> None:
    """Print the catalog's schema revision ('base' when not migrated)."""
    from catalog.migrate import current

    click.echo(current(current_settings().database_url) or "base")
