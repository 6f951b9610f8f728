"""The catalog's tables (SQLAlchemy 2.0 typed ORM). Every index and constraint is named.

Schema changes only through Alembic (``migrations/``); ``tests/catalog/test_migrations.py`` checks
that these models and the migrations agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite so that the column is the rowid and autoincrements.
Id = BigInteger().with_variant(Integer(), "sqlite")

LEVELS = ("coarse", "fine")
RUN_KINDS = ("nightly", "uploads", "manual")
RUN_SCOPES = ("all", "changed", "uploads")
RUN_STATUSES = ("enqueuing", "running", "done", "cancelled")
TAG_STATUSES = ("tagged", "failed")

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


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    sku: Mapped[str] = mapped_column(String(128), unique=True)
    title: Mapped[str] = mapped_column(String(512), default="")
    image_uri: Mapped[str] = mapped_column(String(2048))
    image_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class StyleLabel(Base):
    __tablename__ = "style_labels"
    __table_args__ = (
        UniqueConstraint("taxonomy", "level", "name"),
        CheckConstraint(_in("level", LEVELS), name="level"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    taxonomy: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    # Fine labels point at their (first) coarse parent; coarse labels have none.
    parent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="SET NULL"))
    position: Mapped[int] = mapped_column(Integer, default=0)


class ModelVersion(Base):
    """Every model that has written tags. ``trained_at`` orders them: an older model never
    overwrites a newer model's tags."""

    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    trained_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    taxonomy: Mapped[str] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(64), default="")
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProductStyle(Base):
    __tablename__ = "product_styles"
    __table_args__ = (
        CheckConstraint("score >= 0 AND score <= 1", name="score_range"),
    )

    product_id: Mapped[int] = mapped_column(Id, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    model_version: Mapped[str] = mapped_column(String(64))
    tagged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# The storefront's "products with style X, best first" query walks this index forwards: label_id
# equality, then score DESC, then product_id ASC as the keyset tie-breaker. A real DESC column (not
# ``postgresql_ops``, which is for operator classes) so that SQLite builds the same index.
Index(
    "ix_product_styles_storefront",
    ProductStyle.label_id,
    ProductStyle.score.desc(),
    ProductStyle.product_id,
)


class StyleTruth(Base):
    """Human-verified labels: training data and the yardstick for accuracy on the catalog itself."""

    __tablename__ = "style_truth"

    product_id: Mapped[int] = mapped_column(Id, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)
    source: Mapped[str] = mapped_column(String(64), default="human")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TaggingRun(Base):
    __tablename__ = "tagging_runs"
    __table_args__ = (
        CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
        CheckConstraint(_in("scope", RUN_SCOPES), name="scope"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        Index("ix_tagging_runs_kind_status", "kind", "status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(16))
    model_version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="enqueuing")
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    done: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    # Products with id above this were created after the run started and are not part of it.
    max_product_id: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TagState(Base):
    """One row per product: what was tagged last, with which model, and whether it failed and why."""

    __tablename__ = "tag_state"
    __table_args__ = (
        CheckConstraint(_in("status", TAG_STATUSES), name="status"),
        Index("ix_tag_state_run_id_status", "run_id", "status"),
    )

    product_id: Mapped[int] = mapped_column(Id, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64))
    image_version: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[int | None] = mapped_column(Id, ForeignKey("tagging_runs.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
