"""Alembic environment and revisions: the only way the catalog's schema changes.

``catalog.migrate`` drives it programmatically; ``alembic -c migrations/alembic.ini`` works too.
"""
