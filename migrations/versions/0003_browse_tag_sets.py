"""Storefront browse: products counted by their set of published labels (``tag_sets``, ``tag_set_labels``,
``product_tag_sets`` with each product's browse score, ``label_pairs``: products per two labels), the
indexes that serve a selection in score order, and the read-only views the storefront role may read
(``storefront_styles``, ``storefront_style_pairs``, ``storefront_tag_sets``, ``storefront_tag_set_labels``,
``storefront_products``).
The upgrade fills the tables from the published tag rows already there; the downgrade drops them (they
are derived data).

Frozen history: everything is spelled out here; nothing is imported from the live models.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-15 00:00:00
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ROLE = "styletag_storefront"
# The storefront's interface to these tables: what the storefront role may read (and all catalog.browse
# reads). Simple views keep the tables' plans; storefront_products' LEFT JOIN is removed by the planner
# when no product column is read.
VIEWS = {
    # every style, and how many products show it (0: none)
    "storefront_styles": """
CREATE VIEW storefront_styles AS
SELECT l.id AS label_id, l.taxonomy AS taxonomy, l.level AS level, l.name AS style, l.position AS position,
       COALESCE(c.products, 0) AS products
FROM style_labels l
LEFT JOIN label_pairs c ON c.label_id = 0 AND c.other_id = l.id
""",
    # products showing both within_id and label_id; 0 stands for "any product"
    "storefront_style_pairs": """
CREATE VIEW storefront_style_pairs AS
SELECT label_id AS within_id, other_id AS label_id, products FROM label_pairs
""",
    "storefront_tag_sets": """
CREATE VIEW storefront_tag_sets AS
SELECT id AS set_id, products FROM tag_sets
""",
    "storefront_tag_set_labels": """
CREATE VIEW storefront_tag_set_labels AS
SELECT set_id, label_id FROM tag_set_labels
""",
    "storefront_products": """
CREATE VIEW storefront_products AS
SELECT m.product_id AS product_id, m.set_id AS set_id, m.confidence AS confidence,
       p.sku AS sku, p.title AS title, p.image_uri AS image_uri
FROM product_tag_sets m
LEFT JOIN products p ON p.id = m.product_id
""",
}

PG_FILL = (
    "CREATE TEMP TABLE _product_keys ON COMMIT DROP AS "
    "SELECT product_id, string_agg(label_id::text, ',' ORDER BY label_id) AS key, "
    "round(avg(score)::numeric, 6)::double precision AS confidence FROM product_styles WHERE published "
    "GROUP BY product_id",
    "INSERT INTO tag_sets (key, products) SELECT key, count(*) FROM _product_keys GROUP BY key ORDER BY key",
    "INSERT INTO tag_set_labels (set_id, label_id) SELECT t.id, CAST(u.lid AS BIGINT) FROM tag_sets t "
    "CROSS JOIN LATERAL unnest(string_to_array(t.key, ',')) AS u(lid)",
    "INSERT INTO product_tag_sets (product_id, set_id, confidence) "
    "SELECT k.product_id, t.id, k.confidence FROM _product_keys k JOIN tag_sets t ON t.key = k.key",
    "INSERT INTO label_pairs (label_id, other_id, products) "
    "WITH l AS (SELECT set_id, label_id FROM tag_set_labels UNION ALL SELECT id, 0 FROM tag_sets) "
    "SELECT a.label_id, b.label_id, sum(t.products) FROM tag_sets t JOIN l a ON a.set_id = t.id "
    "JOIN l b ON b.set_id = t.id GROUP BY a.label_id, b.label_id",
    "DROP TABLE _product_keys",
)


def _role() -> str:
    return context.config.attributes.get("storefront_role") or ROLE


def _grant_views(bind) -> None:
    if bind.dialect.name != "postgresql":
        return
    role = _role()
    if bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
        return
    for view in VIEWS:
        bind.exec_driver_sql(f'GRANT SELECT ON {view} TO "{role}"')


def _fill_generic(bind) -> None:
    """SQLite (no ordered string aggregate before 3.44): the sets computed here, from the published rows in
    product order; the browse score is the mean score rounded to 6 decimals (an exact sum)."""
    rows = bind.execute(sa.text("SELECT product_id, label_id, score FROM product_styles WHERE published "
                                "ORDER BY product_id, label_id"))
    members: list[tuple[int, str, float]] = []
    pid, labels, scores = None, [], []

    def flush():
        if pid is not None:
            members.append((pid, ",".join(map(str, labels)), round(math.fsum(scores) / len(scores), 6)))

    for p, lid, score in rows:
        if p != pid:
            flush()
            pid, labels, scores = p, [], []
        labels.append(lid)
        scores.append(score)
    flush()
    sets = Counter(key for _, key, _ in members)
    ids: dict[str, int] = {}
    for key in sorted(sets):
        ids[key] = bind.execute(sa.text("INSERT INTO tag_sets (key, products) VALUES (:k, :n) RETURNING id"),
                                {"k": key, "n": sets[key]}).scalar_one()
    links = [{"s": ids[key], "l": int(lid)} for key in sorted(sets) for lid in key.split(",")]
    if links:
        bind.execute(sa.text("INSERT INTO tag_set_labels (set_id, label_id) VALUES (:s, :l)"), links)
    if members:
        bind.execute(sa.text("INSERT INTO product_tag_sets (product_id, set_id, confidence) VALUES (:p, :s, :c)"),
                     [{"p": p, "s": ids[key], "c": c} for p, key, c in members])
    pairs: Counter[tuple[int, int]] = Counter()
    for key, n in sets.items():
        labels = [0, *map(int, key.split(","))]
        for a in labels:
            for b in labels:
                pairs[(a, b)] += n
    if pairs:
        bind.execute(sa.text("INSERT INTO label_pairs (label_id, other_id, products) VALUES (:a, :b, :n)"),
                     [{"a": a, "b": b, "n": n} for (a, b), n in sorted(pairs.items())])


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "tag_sets",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("products", sa.BigInteger(), nullable=False, server_default="0"),
        sa.CheckConstraint("products >= 0", name=op.f("ck_tag_sets_products")),
        sa.PrimaryKeyConstraint("id", name="pk_tag_sets"),
        sa.UniqueConstraint("key", name="uq_tag_sets_key"),
    )
    op.create_table(
        "tag_set_labels",
        sa.Column("set_id", Id, nullable=False),
        sa.Column("label_id", Id, nullable=False),
        sa.ForeignKeyConstraint(["set_id"], ["tag_sets.id"], name="fk_tag_set_labels_set_id_tag_sets",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["label_id"], ["style_labels.id"], name="fk_tag_set_labels_label_id_style_labels",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("set_id", "label_id", name="pk_tag_set_labels"),
    )
    op.create_index("ix_tag_set_labels_label_id_set_id", "tag_set_labels", ["label_id", "set_id"])
    op.create_table(
        "product_tag_sets",
        sa.Column("product_id", Id, nullable=False),
        sa.Column("set_id", Id, nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_product_tag_sets_product_id_products",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["set_id"], ["tag_sets.id"], name="fk_product_tag_sets_set_id_tag_sets",
                                ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("product_id", name="pk_product_tag_sets"),
    )
    op.create_table(
        "label_pairs",
        sa.Column("label_id", Id, autoincrement=False, nullable=False),
        sa.Column("other_id", Id, autoincrement=False, nullable=False),
        sa.Column("products", sa.BigInteger(), nullable=False, server_default="0"),
        sa.CheckConstraint("products >= 0", name=op.f("ck_label_pairs_products")),
        sa.PrimaryKeyConstraint("label_id", "other_id", name="pk_label_pairs"),
    )
    if bind.dialect.name == "postgresql":
        for stmt in PG_FILL:
            op.execute(stmt)
    else:
        _fill_generic(bind)
    # indexes after the fill: one sort each instead of a million inserts into them
    op.create_index("ix_product_tag_sets_set_id_confidence", "product_tag_sets",
                    ["set_id", sa.text("confidence DESC"), "product_id"])
    op.create_index("ix_product_tag_sets_confidence", "product_tag_sets",
                    [sa.text("confidence DESC"), "product_id", "set_id"])
    for sql in VIEWS.values():
        op.execute(sql)
    _grant_views(bind)


def downgrade() -> None:
    for view in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_index("ix_product_tag_sets_confidence", table_name="product_tag_sets")
    op.drop_index("ix_product_tag_sets_set_id_confidence", table_name="product_tag_sets")
    op.drop_table("product_tag_sets")
    op.drop_table("label_pairs")
    op.drop_index("ix_tag_set_labels_label_id_set_id", table_name="tag_set_labels")
    op.drop_table("tag_set_labels")
    op.drop_table("tag_sets")
