"""What a product row of the shop may say, and why one is refused: the rules of the way in, in one place.

Every caller (``styletag import catalog``, the upload service, a shop's sync job through
:func:`catalog.products.upsert_products`) hands rows to :func:`validate_row`; a row that breaks a rule is a
:class:`Rejection` with its line and one of :data:`REJECT_REASONS`, never a traceback and never half a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.errors import ForbiddenURI, StyletagError
from catalog.labels import CatalogTaxonomy
from catalog.schema import LEVELS
from catalog.storage import Location, check_uri

SKU_MAX = 128  # products.sku is VARCHAR(128)
TITLE_MAX = 512  # products.title is VARCHAR(512)
VERSION_MAX = 128  # products.image_version is VARCHAR(128)
LABEL_SEPARATOR = "|"  # several labels of one level in one CSV cell: "navy|white"

# Why a row was refused: the one list (the import summary, --json and docs/operations.md use these keys).
REJECT_REASONS: dict[str, str] = {
    "invalid_utf8": "the line is not valid UTF-8",
    "bad_row": "not a row of the file's format (CSV field count, JSON syntax, not an object, a wrong type)",
    "no_sku": "no SKU",
    "sku_too_long": f"SKU longer than {SKU_MAX} characters",
    "bad_sku": "SKU with a control character",
    "duplicate_sku": "the SKU is on an earlier line of the file",
    "no_image_uri": "no image URI",
    "forbidden_uri": "image URI malformed or outside STYLETAG_ALLOWED_IMAGE_PREFIXES",
    "title_too_long": f"title longer than {TITLE_MAX} characters",
    "unknown_label": "a label (or level) the taxonomy (--taxonomy) does not have",
    "bad_labels": "labels that contradict the taxonomy (a fine label under none of the row's coarse labels)",
    "image_unreadable": "the image cannot be read (uploads only; an import records it and goes on)",
}


@dataclass(frozen=True)
class ProductInput:
    """One row as the shop gave it (unchecked). ``labels``: level -> a name or a list of names."""

    sku: Any
    image_uri: Any
    title: Any = None
    image_version: Any = None
    labels: Any = None
    line: int = 0

    @classmethod
    def from_mapping(cls, row: Mapping, line: int) -> ProductInput:
        return cls(sku=row.get("sku"), image_uri=row.get("image_uri"), title=row.get("title"),
                   image_version=row.get("image_version"), labels=row.get("labels"), line=line)


@dataclass(frozen=True)
class Rejection:
    line: int
    sku: str | None
    reason: str  # a key of REJECT_REASONS
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.message}"

    def as_dict(self) -> dict:
        return {"line": self.line, "sku": self.sku, "reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class ProductRow:
    """A valid row. ``title`` None keeps the product's title; ``image_version`` None means "not known"
    (read by HEAD, or kept when the URI did not change); ``truth`` maps each level the row names to the
    label ids it says (levels it does not name are left alone)."""

    line: int
    sku: str
    image_uri: str
    title: str | None = None
    image_version: str | None = None
    truth: dict[str, tuple[int, ...]] = field(default_factory=dict)


class RowRejected(StyletagError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RowsRejected(StyletagError):
    """Rows were refused where every row must pass (``--strict``, an upload): nothing was written."""

    def __init__(self, rejections: Sequence[Rejection], what: str = "nothing was written"):
        self.rejections = list(rejections)
        first = self.rejections[0]
        more = f" (and {len(self.rejections) - 1} more)" if len(self.rejections) > 1 else ""
        super().__init__(f"{len(self.rejections)} rows rejected, {what}: {first}{more}")


def _text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowRejected("bad_row", f"{what} must be text, got {type(value).__name__}")
    return str(value).strip()


def _names(value: Any, level: str) -> list[str]:
    if isinstance(value, str):
        names = [n.strip() for n in value.split(LABEL_SEPARATOR)]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n.strip() for n in value]
    else:
        raise RowRejected("bad_row", f"labels of level {level!r} must be a name or a list of names")
    return list(dict.fromkeys(n for n in names if n))


def resolve_labels(labels: Any, taxonomy: CatalogTaxonomy | None) -> dict[str, tuple[int, ...]]:
    """Label names per level -> label ids per level. A fine label's coarse parents are implied when the row
    names no coarse label; named ones must include a parent of each fine label."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise RowRejected("bad_row", "labels must be an object of level -> name(s)")
    named = {str(level): _names(value, str(level)) for level, value in labels.items()}
    named = {level: names for level, names in named.items() if names}
    if not named:
        return {}
    if taxonomy is None:
        raise RowRejected("unknown_label", "the row has labels but no taxonomy was named (--taxonomy)")
    out: dict[str, tuple[int, ...]] = {}
    for level, names in named.items():
        if level not in LEVELS or level not in taxonomy.labels:
            raise RowRejected("unknown_label", f"taxonomy {taxonomy.name!r} has no level {level[:40]!r}")
        for name in names:
            if (level, name) not in taxonomy.ids:
                raise RowRejected("unknown_label", f"no {level} label {name[:64]!r} in taxonomy {taxonomy.name!r}")
        out[level] = tuple(taxonomy.ids[(level, n)] for n in names)
    fine = named.get("fine", [])
    if fine:
        if "coarse" in named:
            for name in fine:
                if not set(taxonomy.parents.get(name, ())) & set(named["coarse"]):
                    raise RowRejected("bad_labels", f"fine label {name!r} is under none of the row's coarse labels "
                                                    f"{named['coarse']} (its parents: {taxonomy.parents.get(name)})")
        else:
            implied = dict.fromkeys(p for name in fine for p in taxonomy.parents.get(name, ()))
            out["coarse"] = tuple(taxonomy.ids[("coarse", p)] for p in implied)
    return out


def validate_row(row: ProductInput, prefixes: Sequence[Location], taxonomy: CatalogTaxonomy | None) -> ProductRow:
    """The checked row, or a RowRejected with its reason. ``prefixes``: the parsed allowed prefixes."""
    sku = _text(row.sku, "SKU")
    if not sku:
        raise RowRejected("no_sku", "no SKU")
    if len(sku) > SKU_MAX:
        raise RowRejected("sku_too_long", f"SKU of {len(sku)} characters (at most {SKU_MAX}): {sku[:40]!r}...")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in sku):
        raise RowRejected("bad_sku", f"control character in SKU {sku[:40]!r}")
    uri = _text(row.image_uri, "image_uri")
    if not uri:
        raise RowRejected("no_image_uri", "no image URI")
    try:
        check_uri(uri, prefixes)
    except ForbiddenURI as exc:
        raise RowRejected("forbidden_uri", str(exc)) from None
    title = _text(row.title, "title")
    if title is not None and len(title) > TITLE_MAX:
        raise RowRejected("title_too_long", f"title of {len(title)} characters (at most {TITLE_MAX})")
    version = _text(row.image_version, "image_version") or None
    if version is not None and len(version) > VERSION_MAX:
        raise RowRejected("bad_row", f"image_version longer than {VERSION_MAX} characters")
    return ProductRow(line=row.line, sku=sku, image_uri=uri, title=title, image_version=version,
                      truth=resolve_labels(row.labels, taxonomy))


def sku_of(row: ProductInput) -> str | None:
    """The row's SKU as far as it can be read (for a rejection's record), or None."""
    return row.sku.strip()[:SKU_MAX] or None if isinstance(row.sku, str) else None
