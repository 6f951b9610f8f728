"""The storefront's read path: tags of a SKU, products by style (keyset-paginated), facet counts.

Every query uses bound parameters and the indexes built for it: ``uq_products_sku`` for a SKU and
``ix_product_styles_storefront`` (label_id, score DESC, product_id) for "products with style X, best
first". Pagination is keyset, never OFFSET, so page 1,000 costs what page 1 costs and a row inserted
meanwhile is neither skipped nor repeated.

The two storefront queries are the hot path (p95 targets of a few milliseconds): their statements are
built once with bound parameters (SQLAlchemy's compiled cache and psycopg's prepared statements then do the
rest), label ids are cached per database (labels are never renumbered or deleted), and a storefront should
pass a ``catalog.db.read_connection`` (autocommit, kept open) rather than a Session per request.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
from datetime import UTC, datetime

from sqlalchemy import Connection, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session

from catalog.errors import NotFound, StyletagError
from catalog.schema import LEVELS, Product, ProductStyle, StyleLabel

MAX_PAGE = 1000


class BadCursor(StyletagError, ValueError):
    """A ``--after`` cursor that this query did not hand out."""


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)).isoformat()


def _check_level(level: str | None) -> None:
    if level is not None and level not in LEVELS:
        raise StyletagError(f"unknown level {str(level)[:40]!r}; use {', '.join(LEVELS)}")


Reader = Session | Connection

_PRODUCT_BY_SKU = select(Product.id, Product.sku, Product.title, Product.image_uri).where(
    Product.sku == bindparam("sku")
)
_TAGS_OF_PRODUCT = (
    select(
        StyleLabel.level, StyleLabel.name, ProductStyle.score, ProductStyle.is_primary,
        ProductStyle.model_version, ProductStyle.tagged_at,
    )
    .join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
    .where(ProductStyle.product_id == bindparam("pid"), ProductStyle.published)
    .order_by(ProductStyle.is_primary.desc(), ProductStyle.score.desc(), StyleLabel.level, StyleLabel.name)
)


def tags_for_sku(session: Reader, sku: str) -> dict:
    """A product and the tags the storefront shows, primary first, then by score; NotFound for an unknown
    SKU. (``catalog.overrides.product_tags`` also lists the hidden ones, for operators.)"""
    product = session.execute(_PRODUCT_BY_SKU, {"sku": sku}).first()
    if product is None:
        raise NotFound(f"no product with SKU {sku[:80]!r}")
    rows = session.execute(_TAGS_OF_PRODUCT, {"pid": product.id}).all()
    return {
        "sku": product.sku,
        "title": product.title,
        "image_uri": product.image_uri,
        "tags": [
            {"level": r.level, "style": r.name, "score": r.score, "is_primary": bool(r.is_primary),
             "model_version": r.model_version, "tagged_at": _iso(r.tagged_at)}
            for r in rows
        ],
    }


def encode_cursor(score: float, product_id: int) -> str:
    raw = json.dumps({"s": score, "p": product_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        score, pid = float(data["s"]), int(data["p"])
    except (ValueError, KeyError, TypeError, UnicodeEncodeError, binascii.Error, OverflowError):
        raise BadCursor(f"bad cursor {cursor[:60]!r}; pass the next_cursor of a previous page") from None
    # A product id is a positive BIGINT: anything else would fail in the database, not here.
    if math.isnan(score) or isinstance(data["p"], bool) or not 0 < pid < 2**63:
        raise BadCursor(f"bad cursor {cursor[:60]!r}; pass the next_cursor of a previous page")
    return score, pid


_LABELS_BY_NAME = select(StyleLabel.id).where(StyleLabel.name == bindparam("name")).order_by(StyleLabel.id)
_LABELS_BY_NAME_LEVEL = (
    select(StyleLabel.id)
    .where(StyleLabel.name == bindparam("name"), StyleLabel.level == bindparam("level"))
    .order_by(StyleLabel.id)
)
# (database URL, style, level) -> label ids. Only found styles are cached. A cached id is checked by every
# query that uses it (the rows name their style; an empty page looks the ids up again), so a database that
# was re-created under the same URL cannot make the cache answer for another style.
_label_cache: dict[tuple[str, str, str | None], tuple[int, ...]] = {}
_label_lock = threading.Lock()


def _label_key(session: Reader, style: str, level: str | None) -> tuple[str, str, str | None]:
    bind = session.engine if isinstance(session, Connection) else session.get_bind()
    return (bind.url.render_as_string(hide_password=True), style, level)


def _label_ids(session: Reader, style: str, level: str | None, refresh: bool = False) -> tuple[int, ...]:
    key = _label_key(session, style, level)
    ids = None if refresh else _label_cache.get(key)
    if ids is not None:
        return ids
    if level is None:
        ids = tuple(session.scalars(_LABELS_BY_NAME, {"name": style}))
    else:
        ids = tuple(session.scalars(_LABELS_BY_NAME_LEVEL, {"name": style, "level": level}))
    if not ids:
        where = f" at level {level}" if level else ""
        raise NotFound(f"no style {style[:80]!r}{where}; 'styletag facets' lists the styles")
    with _label_lock:
        if len(_label_cache) > 10_000:
            _label_cache.clear()
        _label_cache[key] = ids
    return ids


_FIND_COLUMNS = select(
    ProductStyle.product_id, ProductStyle.score, ProductStyle.is_primary, ProductStyle.model_version,
    ProductStyle.tagged_at, Product.sku, Product.title, Product.image_uri, StyleLabel.level, StyleLabel.name,
).join(Product, Product.id == ProductStyle.product_id).join(StyleLabel, StyleLabel.id == ProductStyle.label_id)
_FIND_ORDER = (ProductStyle.score.desc(), ProductStyle.product_id)
# The common case, one label and no cursor, as one prebuilt statement. ``published`` in every query: what
# the storefront may show (catalog.publishing), and the condition of the partial storefront index.
_FIND_FIRST_PAGE = (
    _FIND_COLUMNS.where(ProductStyle.label_id == bindparam("lid"), ProductStyle.published,
                        ProductStyle.score >= bindparam("min_score"))
    .order_by(*_FIND_ORDER)
    .limit(bindparam("lim"))
)


def find_by_style(
    session: Reader,
    style: str,
    level: str | None = None,
    min_score: float = 0.0,
    limit: int = 50,
    after: str | None = None,
) -> tuple[list[dict], str | None]:
    """Products tagged ``style`` with score >= ``min_score``, best first (ties by product id).
    Returns the page and the cursor of the next one (None on the last page)."""
    _check_level(level)
    if not 1 <= limit <= MAX_PAGE:
        raise StyletagError(f"limit must be between 1 and {MAX_PAGE}")
    if not 0 <= min_score <= 1:  # NaN too
        raise StyletagError(f"min_score must be a number between 0 and 1, got {min_score!r}")
    cursor = decode_cursor(after) if after else None
    label_ids = _label_ids(session, style, level)
    rows = _find_rows(session, label_ids, min_score, limit, cursor)
    if not rows or any(r.name != style or (level is not None and r.level != level) for r in rows):
        fresh = _label_ids(session, style, level, refresh=True)  # a cached id that went stale
        if fresh != label_ids:
            rows = _find_rows(session, fresh, min_score, limit, cursor)
    page = rows[:limit]
    items = [
        {"sku": r.sku, "title": r.title, "image_uri": r.image_uri, "product_id": r.product_id, "level": r.level,
         "style": r.name, "score": r.score, "is_primary": bool(r.is_primary), "model_version": r.model_version,
         "tagged_at": _iso(r.tagged_at)}
        for r in page
    ]
    next_cursor = encode_cursor(page[-1].score, page[-1].product_id) if len(rows) > limit else None
    return items, next_cursor


def _find_rows(session: Reader, label_ids: tuple[int, ...], min_score: float, limit: int,
               cursor: tuple[float, int] | None) -> list:
    if len(label_ids) == 1 and cursor is None:
        return session.execute(_FIND_FIRST_PAGE, {"lid": label_ids[0], "min_score": min_score, "lim": limit + 1}).all()
    query = _FIND_COLUMNS.where(ProductStyle.published, ProductStyle.score >= min_score)
    if len(label_ids) == 1:
        query = query.where(ProductStyle.label_id == label_ids[0])
    else:  # the same name in several taxonomies or levels
        query = query.where(ProductStyle.label_id.in_(label_ids))
    if cursor is not None:
        score, pid = cursor
        # The redundant ``score <= s`` becomes an index condition, so the scan starts at the cursor
        # instead of filtering every better-scored row of earlier pages.
        query = query.where(
            ProductStyle.score <= score,
            or_(ProductStyle.score < score, and_(ProductStyle.score == score, ProductStyle.product_id > pid)),
        )
    return session.execute(query.order_by(*_FIND_ORDER).limit(limit + 1)).all()


def facet_counts(
    session: Reader, level: str | None = None, min_score: float = 0.0, primary_only: bool = True
) -> list[dict]:
    """Products per style (every known style, zero counts included), coarse before fine."""
    _check_level(level)
    on = [ProductStyle.label_id == StyleLabel.id, ProductStyle.published, ProductStyle.score >= min_score]
    if primary_only:
        on.append(ProductStyle.is_primary.is_(True))
    query = (
        select(StyleLabel.taxonomy, StyleLabel.level, StyleLabel.name, func.count(ProductStyle.product_id))
        .outerjoin(ProductStyle, and_(*on))
        .group_by(StyleLabel.id, StyleLabel.taxonomy, StyleLabel.level, StyleLabel.name, StyleLabel.position)
        .order_by(StyleLabel.taxonomy, StyleLabel.level, StyleLabel.position)
    )
    if level is not None:
        query = query.where(StyleLabel.level == level)
    return [
        {"taxonomy": taxonomy, "level": lvl, "style": name, "count": int(count)}
        for taxonomy, lvl, name, count in session.execute(query)
    ]


def sample_image_uris(session: Reader, n: int = 10, prefixes: tuple[str, ...] = ()) -> list[str]:
    """Image URIs of live products to check the configuration with (``worker/ops/preflight.py``): the first
    and last ``n`` by id (the oldest and newest imports) and, for each of ``prefixes``, one whose URI starts
    with it, wherever it is in the catalog."""
    live = select(Product.image_uri).where(Product.archived_at.is_(None)).limit(n)
    found = list(session.scalars(live.order_by(Product.id))) + list(session.scalars(live.order_by(Product.id.desc())))
    for prefix in prefixes:
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        uri = session.scalar(select(Product.image_uri).where(
            Product.archived_at.is_(None), Product.image_uri.like(pattern, escape="\\")).limit(1))
        if uri is not None:
            found.append(uri)
    return list(dict.fromkeys(found))
