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
    func,
    text,
    true,
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

LEVELS = ("coarse", "fine", "colour")
RUN_KINDS = ("nightly", "uploads", "manual", "shadow")
RUN_SCOPES = ("all", "changed", "uploads")
RUN_STATUSES = ("enqueuing", "running", "done", "cancelled")
# review: tagged, but held back from the storefront until a person accepts or corrects it
TAG_STATUSES = ("tagged", "review", "failed")
TAG_SOURCES = ("model", "manual")
MODEL_STATUSES = ("shadow", "active", "retired")

STOREFRONT_VIEW = "storefront_tags"
STOREFRONT_ROLE = "styletag_storefront"
# What the storefront may show: published tags only (not archived, not held for review, a person's
# correction in place of the model's tag at its level; catalog.publishing keeps the flag).
STOREFRONT_VIEW_SQL = f"""
CREATE VIEW {STOREFRONT_VIEW} AS
SELECT p.id AS product_id, p.sku AS sku, p.title AS title, l.taxonomy AS taxonomy,
       l.level AS level, l.name AS style, s.score AS score, s.is_primary AS is_primary,
       s.source AS source, s.model_version AS model_version, s.tagged_at AS tagged_at
FROM product_styles s
JOIN products p ON p.id = s.product_id
JOIN style_labels l ON l.id = s.label_id
WHERE s.published
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
    title: Mapped[str] = mapped_column(String(512), default="", server_default=text("''"))
    image_uri: Mapped[str] = mapped_column(String(2048))
    image_version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow,
                                                 server_default=func.now())
    # Archived products stay (tags, truth, history) but retags skip them and the storefront hides them.
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


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
    position: Mapped[int] = mapped_column(Integer, default=0)


class LabelParent(Base):
    """A fine label's coarse parents: all of them (a multi-label taxonomy names several)."""

    __tablename__ = "label_parents"

    label_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)


class ModelVersion(Base):
    """The model registry: every model that may write tags. ``status`` active is what workers serve
    (one per taxonomy); which tags win is decided by activation, never by training time."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        Index("uq_models_active_taxonomy", "taxonomy", unique=True, postgresql_where=text("status = 'active'"),
              sqlite_where=text("status = 'active'")),
    )

    # hash of the weights and of the metadata that changes predictions (preprocessing, taxonomy, thresholds)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    trained_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    taxonomy: Mapped[str] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(64), default="")
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    path: Mapped[str] = mapped_column(String(2048), default="", server_default=text("''"))
    meta: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")  # recorded metrics, command (JSON)
    status: Mapped[str] = mapped_column(String(16), default="shadow", server_default="shadow")
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    activated_by: Mapped[str | None] = mapped_column(String(128))
    # Order of activations: the latest is the active one; rollback re-activates the one before it.
    activation_seq: Mapped[int | None] = mapped_column(BigInteger)


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
    # model: written by a model; manual: a person's correction, never overwritten by a model
    source: Mapped[str] = mapped_column(String(16), default="model", server_default="model")
    # what the storefront shows (catalog.publishing): not archived, not in review, not overridden
    published: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    set_by: Mapped[str | None] = mapped_column(String(128))  # who set a manual tag


# The storefront's "products with style X, best first" query walks this index forwards: label_id
# equality, then score DESC, then product_id ASC as the keyset tie-breaker; only published rows are in
# it. A real DESC column (not ``postgresql_ops``, which is for operator classes) so that SQLite builds
# the same index.
Index(
    "ix_product_styles_storefront",
    ProductStyle.label_id,
    ProductStyle.score.desc(),
    ProductStyle.product_id,
    postgresql_where=ProductStyle.published,
    sqlite_where=ProductStyle.published,
)
ProductStyle.__table__.append_constraint(CheckConstraint(_in("source", TAG_SOURCES), name="source"))


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
    done: Mapped[int] = mapped_column(BigInteger, default=0)  # products this run wrote (review included)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # not written (gone, archived)
    review: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of done: held for review
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
    reason: Mapped[str | None] = mapped_column(String(32))  # why it failed, or why it is in review
    error: Mapped[str | None] = mapped_column(Text)
    confidence: Mapped[float | None] = mapped_column(Float)  # the score the review threshold was held against
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[int | None] = mapped_column(Id, ForeignKey("tagging_runs.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ShadowTag(Base):
    """A registered model's predictions written beside the storefront's tags (``retag --shadow``), for
    ``styletag model compare`` before activation. Never shown by the storefront."""

    __tablename__ = "shadow_tags"

    model_version: Mapped[str] = mapped_column(String(64), ForeignKey("models.version", ondelete="CASCADE"),
                                               primary_key=True)
    product_id: Mapped[int] = mapped_column(Id, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    run_id: Mapped[int | None] = mapped_column(Id, ForeignKey("tagging_runs.id", ondelete="SET NULL"))
    tagged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class RunFailureCount(Base):
    """Failures of one run by reason, counted when they are counted in ``tagging_runs.failed``: a run's
    report stays exact whatever later runs did to the same products."""

    __tablename__ = "run_failure_counts"

    run_id: Mapped[int] = mapped_column(Id, ForeignKey("tagging_runs.id", ondelete="CASCADE"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


# --- browse: products counted by their set of published labels (catalog.facets keeps these) ------------


class TagSet(Base):
    """One distinct set of published labels (``key``: the sorted label ids, comma-separated) and how many
    products carry exactly that set. Facet counts within a selection are sums over the sets that contain
    every selected label, so they read a few thousand set rows instead of a million product rows."""

    __tablename__ = "tag_sets"
    __table_args__ = (CheckConstraint("products >= 0", name="products"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    products: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class TagSetLabel(Base):
    """The labels of a set (written once, when the set is first seen; a set never changes its labels)."""

    __tablename__ = "tag_set_labels"
    __table_args__ = (Index("ix_tag_set_labels_label_id_set_id", "label_id", "set_id"),)

    set_id: Mapped[int] = mapped_column(Id, ForeignKey("tag_sets.id", ondelete="CASCADE"), primary_key=True)
    label_id: Mapped[int] = mapped_column(Id, ForeignKey("style_labels.id", ondelete="CASCADE"), primary_key=True)


class ProductTagSet(Base):
    """A product's set of published labels and its browse score (``confidence``: the mean score of those
    tags, rounded to 6 decimals). Only products with at least one published tag have a row."""

    __tablename__ = "product_tag_sets"

    product_id: Mapped[int] = mapped_column(Id, ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    set_id: Mapped[int] = mapped_column(Id, ForeignKey("tag_sets.id", ondelete="RESTRICT"))
    confidence: Mapped[float] = mapped_column(Float)


# Browse walks one of these forwards, keyset on (confidence DESC, product_id): per set (a selection made of
# few products: one index descent per set), or the whole catalog in score order with the set as a filter
# read from the index itself (a selection made of many products).
Index("ix_product_tag_sets_set_id_confidence", ProductTagSet.set_id, ProductTagSet.confidence.desc(),
      ProductTagSet.product_id)
Index("ix_product_tag_sets_confidence", ProductTagSet.confidence.desc(), ProductTagSet.product_id,
      ProductTagSet.set_id)


# Label 0 (no label has it) stands for "any product the storefront shows" in label_pairs.
ALL_PRODUCTS = 0
# Read-only views over these tables (migration 0003), granted to the storefront role: catalog.browse reads
# only these, so a storefront connected as that role runs the same queries.
BROWSE_VIEWS = ("storefront_styles", "storefront_style_pairs", "storefront_tag_sets", "storefront_tag_set_labels",
                "storefront_products")


class LabelPair(Base):
    """Products carrying both ``label_id`` and ``other_id`` (both orders stored; ``label_id = other_id``:
    products carrying it; label :data:`ALL_PRODUCTS` is carried by every shown product, so ``(0, x)`` is
    the whole catalog's facet count of x and ``(0, 0)`` the number of products shown). The facets of a
    one-style selection are one index range of this table. Labels are never deleted, so there is no
    foreign key (which would also forbid label 0)."""

    __tablename__ = "label_pairs"
    __table_args__ = (CheckConstraint("products >= 0", name="products"),)

    label_id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    other_id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    products: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
