"""Any shop's catalog and the model lifecycle: archived products and server-side timestamp defaults,
labels with several parents (``label_parents``, existing parents kept) and a ``colour`` level, the model
registry (``model_versions`` becomes ``models``: path, status shadow/active/retired, activation order),
tag sources (model / manual) and the ``published`` flag the storefront view filters on, a ``review`` tag
status, per-run skipped / review counters and failure counts by reason, and shadow predictions.

Frozen history: everything is spelled out here; nothing is imported from the live models.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)
VIEW = "storefront_tags"
ROLE = "styletag_storefront"

VIEW_0001 = f"""
CREATE VIEW {VIEW} AS
SELECT p.id AS product_id, p.sku AS sku, p.title AS title, l.taxonomy AS taxonomy,
       l.level AS level, l.name AS style, s.score AS score, s.is_primary AS is_primary,
       s.model_version AS model_version, s.tagged_at AS tagged_at
FROM product_styles s
JOIN products p ON p.id = s.product_id
JOIN style_labels l ON l.id = s.label_id
"""  # noqa: S608 - constant identifiers, no input
VIEW_0002 = f"""
CREATE VIEW {VIEW} AS
SELECT p.id AS product_id, p.sku AS sku, p.title AS title, l.taxonomy AS taxonomy,
       l.level AS level, l.name AS style, s.score AS score, s.is_primary AS is_primary,
       s.source AS source, s.model_version AS model_version, s.tagged_at AS tagged_at
FROM product_styles s
JOIN products p ON p.id = s.product_id
JOIN style_labels l ON l.id = s.label_id
WHERE s.published
"""  # noqa: S608 - constant identifiers, no input


def _role() -> str:
    return context.config.attributes.get("storefront_role") or ROLE


def _grant_view(bind) -> None:
    """The read-only role may read the (re-created) view, when the role exists."""
    if bind.dialect.name != "postgresql":
        return
    role = _role()
    if bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
        return
    bind.exec_driver_sql(f'GRANT SELECT ON {VIEW} TO "{role}"')


def upgrade() -> None:
    bind = op.get_bind()
    op.execute(f"DROP VIEW IF EXISTS {VIEW}")

    with op.batch_alter_table("products") as t:
        t.alter_column("title", existing_type=sa.String(512), server_default=sa.text("''"), existing_nullable=False)
        t.alter_column("created_at", existing_type=TZ, server_default=sa.func.now(), existing_nullable=False)
        t.alter_column("updated_at", existing_type=TZ, server_default=sa.func.now(), existing_nullable=False)
        t.add_column(sa.Column("archived_at", TZ, nullable=True))

    op.create_table(
        "label_parents",
        sa.Column("label_id", Id, nullable=False),
        sa.Column("parent_id", Id, nullable=False),
        sa.ForeignKeyConstraint(["label_id"], ["style_labels.id"], name="fk_label_parents_label_id_style_labels",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["parent_id"], ["style_labels.id"], name="fk_label_parents_parent_id_style_labels",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("label_id", "parent_id", name="pk_label_parents"),
    )
    op.execute("INSERT INTO label_parents (label_id, parent_id) "
               "SELECT id, parent_id FROM style_labels WHERE parent_id IS NOT NULL")
    with op.batch_alter_table("style_labels") as t:
        t.drop_constraint("fk_style_labels_parent_id_style_labels", type_="foreignkey")
        t.drop_column("parent_id")
        t.drop_constraint("ck_style_labels_level", type_="check")
        t.create_check_constraint("ck_style_labels_level", "level IN ('coarse', 'fine', 'colour')")

    op.rename_table("model_versions", "models")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE models RENAME CONSTRAINT pk_model_versions TO pk_models")
    with op.batch_alter_table("models") as t:
        t.add_column(sa.Column("path", sa.String(2048), nullable=False, server_default=sa.text("''")))
        t.add_column(sa.Column("meta", sa.Text(), nullable=False, server_default="{}"))
        t.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="shadow"))
        t.add_column(sa.Column("activated_at", TZ, nullable=True))
        t.add_column(sa.Column("activated_by", sa.String(128), nullable=True))
        t.add_column(sa.Column("activation_seq", sa.BigInteger(), nullable=True))
        t.create_check_constraint("ck_models_status", "status IN ('shadow', 'active', 'retired')")
    op.create_index("uq_models_active_taxonomy", "models", ["taxonomy"], unique=True,
                    postgresql_where=sa.text("status = 'active'"), sqlite_where=sa.text("status = 'active'"))

    op.drop_index("ix_product_styles_storefront", table_name="product_styles")
    with op.batch_alter_table("product_styles") as t:
        t.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="model"))
        t.add_column(sa.Column("published", sa.Boolean(), nullable=False, server_default=sa.true()))
        t.add_column(sa.Column("set_by", sa.String(128), nullable=True))
        t.create_check_constraint("ck_product_styles_source", "source IN ('model', 'manual')")
    op.create_index("ix_product_styles_storefront", "product_styles", ["label_id", sa.text("score DESC"), "product_id"],
                    postgresql_where=sa.text("published"), sqlite_where=sa.text("published"))

    with op.batch_alter_table("tag_state") as t:
        t.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        t.drop_constraint("ck_tag_state_status", type_="check")
        t.create_check_constraint("ck_tag_state_status", "status IN ('tagged', 'review', 'failed')")

    with op.batch_alter_table("tagging_runs") as t:
        t.add_column(sa.Column("skipped", sa.BigInteger(), nullable=False, server_default="0"))
        t.add_column(sa.Column("review", sa.BigInteger(), nullable=False, server_default="0"))
        t.drop_constraint("ck_tagging_runs_kind", type_="check")
        t.create_check_constraint("ck_tagging_runs_kind", "kind IN ('nightly', 'uploads', 'manual', 'shadow')")

    op.create_table(
        "shadow_tags",
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("product_id", Id, nullable=False),
        sa.Column("label_id", Id, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("run_id", Id, nullable=True),
        sa.Column("tagged_at", TZ, nullable=False, server_default=sa.func.now()),
        sa.ForeignKeyConstraint(["model_version"], ["models.version"], name="fk_shadow_tags_model_version_models",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_shadow_tags_product_id_products",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["label_id"], ["style_labels.id"], name="fk_shadow_tags_label_id_style_labels",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["tagging_runs.id"], name="fk_shadow_tags_run_id_tagging_runs",
                                ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("model_version", "product_id", "label_id", name="pk_shadow_tags"),
    )
    op.create_table(
        "run_failure_counts",
        sa.Column("run_id", Id, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["tagging_runs.id"], name="fk_run_failure_counts_run_id_tagging_runs",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "reason", name="pk_run_failure_counts"),
    )
    op.execute(VIEW_0002)
    _grant_view(bind)


def downgrade() -> None:
    bind = op.get_bind()
    op.execute(f"DROP VIEW IF EXISTS {VIEW}")
    op.drop_table("run_failure_counts")
    op.drop_table("shadow_tags")
    with op.batch_alter_table("tagging_runs") as t:
        t.drop_constraint("ck_tagging_runs_kind", type_="check")
        t.create_check_constraint("ck_tagging_runs_kind", "kind IN ('nightly', 'uploads', 'manual')")
        t.drop_column("review")
        t.drop_column("skipped")
    op.execute("UPDATE tag_state SET status = 'tagged' WHERE status = 'review'")
    with op.batch_alter_table("tag_state") as t:
        t.drop_constraint("ck_tag_state_status", type_="check")
        t.create_check_constraint("ck_tag_state_status", "status IN ('tagged', 'failed')")
        t.drop_column("confidence")
    op.drop_index("ix_product_styles_storefront", table_name="product_styles")
    op.execute("DELETE FROM product_styles WHERE source = 'manual'")
    with op.batch_alter_table("product_styles") as t:
        t.drop_constraint("ck_product_styles_source", type_="check")
        t.drop_column("set_by")
        t.drop_column("published")
        t.drop_column("source")
    op.create_index("ix_product_styles_storefront", "product_styles", ["label_id", sa.text("score DESC"), "product_id"])
    op.drop_index("uq_models_active_taxonomy", table_name="models")
    with op.batch_alter_table("models") as t:
        t.drop_constraint("ck_models_status", type_="check")
        for column in ("activation_seq", "activated_by", "activated_at", "status", "meta", "path"):
            t.drop_column(column)
    op.rename_table("models", "model_versions")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE model_versions RENAME CONSTRAINT pk_models TO pk_model_versions")
    op.execute("DELETE FROM style_labels WHERE level = 'colour'")
    with op.batch_alter_table("style_labels") as t:
        t.drop_constraint("ck_style_labels_level", type_="check")
        t.create_check_constraint("ck_style_labels_level", "level IN ('coarse', 'fine')")
        t.add_column(sa.Column("parent_id", Id, nullable=True))
        t.create_foreign_key("fk_style_labels_parent_id_style_labels", "style_labels", ["parent_id"], ["id"],
                             ondelete="SET NULL")
    # a label keeps its first parent (by id), as before
    op.execute("UPDATE style_labels SET parent_id = (SELECT MIN(lp.parent_id) FROM label_parents lp "
               "WHERE lp.label_id = style_labels.id)")
    op.drop_table("label_parents")
    with op.batch_alter_table("products") as t:
        t.drop_column("archived_at")
        t.alter_column("updated_at", existing_type=TZ, server_default=None, existing_nullable=False)
        t.alter_column("created_at", existing_type=TZ, server_default=None, existing_nullable=False)
        t.alter_column("title", existing_type=sa.String(512), server_default=None, existing_nullable=False)
    op.execute(VIEW_0001)
    _grant_view(bind)
