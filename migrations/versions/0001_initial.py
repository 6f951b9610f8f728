"""Initial catalog: every table, index and constraint of the first schema, the storefront view and,
on PostgreSQL, the read-only ``styletag_storefront`` role.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

# Frozen history: this revision spells out what it creates and never imports the live models
# (catalog/schema.py), so a later schema change cannot rewrite what 0001 did.
STOREFRONT_VIEW = "storefront_tags"
STOREFRONT_ROLE = "styletag_storefront"
STOREFRONT_VIEW_SQL = f"""
CREATE VIEW {STOREFRONT_VIEW} AS
SELECT p.id AS product_id, p.sku AS sku, p.title AS title, l.taxonomy AS taxonomy,
       l.level AS level, l.name AS style, s.score AS score, s.is_primary AS is_primary,
       s.model_version AS model_version, s.tagged_at AS tagged_at
FROM product_styles s
JOIN products p ON p.id = s.product_id
JOIN style_labels l ON l.id = s.label_id
"""  # noqa: S608 - constant identifiers, no input

# BIGINT on PostgreSQL; INTEGER on SQLite so the primary key is the rowid and autoincrements.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)
TABLES = ("products", "style_labels", "model_versions", "product_styles", "style_truth", "tagging_runs", "tag_state")


def storefront_role() -> str:
    """The read-only role's name: ``catalog.migrate`` may pass another one (tests, a second install)."""
    from alembic import context

    return context.config.attributes.get("storefront_role") or STOREFRONT_ROLE


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("sku", sa.String(128), nullable=False),
        sa.Column("title", sa.String(512), nullable=False),
        sa.Column("image_uri", sa.String(2048), nullable=False),
        sa.Column("image_version", sa.String(128), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_products"),
        sa.UniqueConstraint("sku", name="uq_products_sku"),
    )
    op.create_table(
        "style_labels",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("taxonomy", sa.String(64), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("parent_id", Id, nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.CheckConstraint("level IN ('coarse', 'fine')", name="ck_style_labels_level"),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["style_labels.id"], name="fk_style_labels_parent_id_style_labels", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_style_labels"),
        sa.UniqueConstraint("taxonomy", "level", "name", name="uq_style_labels_taxonomy_level_name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("trained_at", TZ, nullable=False),
        sa.Column("taxonomy", sa.String(64), nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("registered_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_model_versions"),
    )
    op.create_table(
        "product_styles",
        sa.Column("product_id", Id, nullable=False),
        sa.Column("label_id", Id, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("tagged_at", TZ, nullable=False),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="ck_product_styles_score_range"),
        sa.ForeignKeyConstraint(
            ["label_id"], ["style_labels.id"], name="fk_product_styles_label_id_style_labels", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_product_styles_product_id_products", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("product_id", "label_id", name="pk_product_styles"),
    )
    op.create_index(
        "ix_product_styles_storefront", "product_styles", ["label_id", sa.text("score DESC"), "product_id"]
    )
    op.create_table(
        "style_truth",
        sa.Column("product_id", Id, nullable=False),
        sa.Column("label_id", Id, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["label_id"], ["style_labels.id"], name="fk_style_truth_label_id_style_labels", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_style_truth_product_id_products", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("product_id", "label_id", name="pk_style_truth"),
    )
    op.create_table(
        "tagging_runs",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("done", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("max_product_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.CheckConstraint("kind IN ('nightly', 'uploads', 'manual')", name="ck_tagging_runs_kind"),
        sa.CheckConstraint("scope IN ('all', 'changed', 'uploads')", name="ck_tagging_runs_scope"),
        sa.CheckConstraint("status IN ('enqueuing', 'running', 'done', 'cancelled')", name="ck_tagging_runs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_tagging_runs"),
    )
    op.create_index("ix_tagging_runs_kind_status", "tagging_runs", ["kind", "status"])
    op.create_table(
        "tag_state",
        sa.Column("product_id", Id, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("image_version", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("run_id", Id, nullable=True),
        sa.Column("updated_at", TZ, nullable=False),
        sa.CheckConstraint("status IN ('tagged', 'failed')", name="ck_tag_state_status"),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name="fk_tag_state_product_id_products", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["tagging_runs.id"], name="fk_tag_state_run_id_tagging_runs", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("product_id", name="pk_tag_state"),
    )
    op.create_index("ix_tag_state_run_id_status", "tag_state", ["run_id", "status"])

    op.execute(STOREFRONT_VIEW_SQL)
    if op.get_bind().dialect.name == "postgresql":
        _create_storefront_role()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        _drop_storefront_role()
    op.execute(f"DROP VIEW IF EXISTS {STOREFRONT_VIEW}")
    op.drop_index("ix_tag_state_run_id_status", table_name="tag_state")
    op.drop_table("tag_state")
    op.drop_index("ix_tagging_runs_kind_status", table_name="tagging_runs")
    op.drop_table("tagging_runs")
    op.drop_table("style_truth")
    op.drop_index("ix_product_styles_storefront", table_name="product_styles")
    op.drop_table("product_styles")
    op.drop_table("model_versions")
    op.drop_table("style_labels")
    op.drop_table("products")


# --- PostgreSQL: a role that can read the storefront view and nothing else ---------------------------
# Roles are cluster-wide (shared by every database of the server), so creating and dropping one must
# tolerate another database having done it first; each attempt runs in a savepoint so that a refusal
# does not abort the migration's transaction.


def _role_exists(bind, role: str) -> bool:
    return bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is not None


def _create_storefront_role() -> None:
    bind = op.get_bind()
    role = storefront_role()
    if not _role_exists(bind, role):
        may_create = bind.execute(
            sa.text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).scalar()
        if not may_create:
            log.warning(
                "role %s not created: the migrating user may not create roles (grant CREATEROLE or create it "
                "by hand, then run 'styletag db upgrade' again); storefront view created without it",
                role,
            )
            return
        try:
            with bind.begin_nested():
                bind.exec_driver_sql(f'CREATE ROLE "{role}" NOLOGIN')
        except sa.exc.DBAPIError as exc:  # created meanwhile by a migration of another database
            if not _role_exists(bind, role):
                log.warning("role %s not created: %s", role, str(exc.orig).strip().splitlines()[0])
                return
    tables = ", ".join(TABLES)
    bind.exec_driver_sql(f'REVOKE ALL ON {tables} FROM "{role}"')
    bind.exec_driver_sql(f'REVOKE ALL ON {STOREFRONT_VIEW} FROM "{role}"')
    bind.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{_schema_name(bind)}" TO "{role}"')
    bind.exec_driver_sql(f'GRANT SELECT ON {STOREFRONT_VIEW} TO "{role}"')


def _schema_name(bind) -> str:
    return bind.execute(sa.text("SELECT current_schema()")).scalar() or "public"


def _drop_storefront_role() -> None:
    bind = op.get_bind()
    role = storefront_role()
    if not _role_exists(bind, role):
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql(f'REVOKE ALL ON {STOREFRONT_VIEW} FROM "{role}"')
            bind.exec_driver_sql(f'REVOKE ALL ON SCHEMA "{_schema_name(bind)}" FROM "{role}"')
    except sa.exc.DBAPIError as exc:
        log.warning("privileges of role %s not revoked: %s", role, str(exc.orig).strip().splitlines()[0])
        return
    # Other databases of this server may still grant the role something; then it stays.
    in_use_elsewhere = bind.execute(
        sa.text(
            "SELECT 1 FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid "
            "WHERE r.rolname = :r AND d.dbid <> (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"r": role},
    ).first()
    if in_use_elsewhere:
        log.info("role %s kept: other databases of this server still use it", role)
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql(f'DROP ROLE "{role}"')
    except sa.exc.DBAPIError as exc:
        log.warning("role %s not dropped: %s", role, str(exc.orig).strip().splitlines()[0])
