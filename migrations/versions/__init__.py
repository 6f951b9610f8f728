"""Alembic revisions (a package so that an installed styletag ships them)."""
