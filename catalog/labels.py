"""Style labels in the catalog, kept in step with a model's taxonomy.

Models speak in label *indices* (fine label 7); the catalog speaks in ``style_labels.id``. A
:class:`LabelMap` translates between them, and :func:`label_map` refuses to build one when the
catalog's labels for that taxonomy name differ from the taxonomy at hand: writing tags through a
shifted map would silently mislabel every product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select, text
from sqlalchemy.orm import Session, object_session

from catalog.db import dialect_insert
from catalog.errors import NotFound, StyletagError, TaxonomyError, TaxonomyMismatch
from catalog.schema import LabelParent, StyleLabel
from model.taxonomy import Taxonomy


@dataclass(frozen=True)
class LabelMap:
    """``coarse_ids[i]`` / ``fine_ids[j]`` are the catalog ids of the taxonomy's i-th coarse and j-th
    fine label; ``by_name[(level, name)]`` is the id of a label by name."""

    taxonomy: str
    coarse_ids: list[int]
    fine_ids: list[int]
    by_name: dict[tuple[str, str], int] = field(default_factory=dict)

    def id_for(self, level: str, name: str) -> int:
        try:
            return self.by_name[(level, name)]
        except KeyError:
            raise NotFound(f"no {level} style {name!r} in taxonomy {self.taxonomy!r}") from None


def _rows(session: Session, taxonomy: str) -> list[StyleLabel]:
    stmt = select(StyleLabel).where(StyleLabel.taxonomy == taxonomy).order_by(StyleLabel.level, StyleLabel.position)
    return list(session.scalars(stmt))


def sync_labels(session: Session, taxonomy: Taxonomy) -> LabelMap:
    """Insert the taxonomy's labels if missing (idempotent, safe against a concurrent importer via
    ON CONFLICT DO NOTHING) and return the verified map. Does not commit."""
    if _rows(session, taxonomy.name):
        # A known taxonomy must match as it is: inserting a renamed label first would report a gap.
        return label_map(session, taxonomy.name, expect=taxonomy)
    rows = [{"taxonomy": taxonomy.name, "level": level.name, "name": name, "position": i}
            for level in (taxonomy.coarse, taxonomy.fine) for i, name in enumerate(level.labels)]
    session.execute(dialect_insert(session, StyleLabel).on_conflict_do_nothing(), rows)
    ids = {(row.level, row.name): row.id for row in _rows(session, taxonomy.name)}
    links = [{"label_id": ids[("fine", name)], "parent_id": ids[("coarse", taxonomy.coarse.labels[c])]}
             for f, name in enumerate(taxonomy.fine.labels) for c in taxonomy.parents[f]]
    session.execute(dialect_insert(session, LabelParent).on_conflict_do_nothing(), links)
    return label_map(session, taxonomy.name, expect=taxonomy)


def label_map(session: Session, taxonomy_name: str, expect: Taxonomy | None = None) -> LabelMap:
    """The catalog's labels of ``taxonomy_name``; NotFound when there are none, TaxonomyMismatch when
    ``expect`` is given and the names, order or parents differ."""
    rows = _rows(session, taxonomy_name)
    if not rows:
        raise NotFound(f"no labels for taxonomy {taxonomy_name!r} in the catalog; import or sync it first")
    coarse = [r for r in rows if r.level == "coarse"]
    fine = [r for r in rows if r.level == "fine"]
    if [r.position for r in coarse] != list(range(len(coarse))) or [r.position for r in fine] != list(range(len(fine))):
        raise TaxonomyMismatch(f"catalog labels of taxonomy {taxonomy_name!r} have gaps in their positions")
    if expect is not None:
        _compare(expect, coarse, fine)
    by_name = {(r.level, r.name): r.id for r in rows}
    return LabelMap(
        taxonomy=taxonomy_name, coarse_ids=[r.id for r in coarse], fine_ids=[r.id for r in fine], by_name=by_name
    )


def _compare(tax: Taxonomy, coarse: list[StyleLabel], fine: list[StyleLabel]) -> None:
    hint = "use a new taxonomy name for a changed label set"
    have = [r.name for r in coarse]
    if have != list(tax.coarse.labels):
        raise TaxonomyMismatch(
            f"taxonomy {tax.name!r}: catalog has coarse labels {have}, the model has {list(tax.coarse.labels)}; {hint}"
        )
    have = [r.name for r in fine]
    if have != list(tax.fine.labels):
        raise TaxonomyMismatch(
            f"taxonomy {tax.name!r}: catalog has fine labels {have}, the model has {list(tax.fine.labels)}; {hint}"
        )
    session = object_session(fine[0]) if fine else None
    links: dict[int, set[int]] = {}
    if session is not None:
        for label_id, parent_id in session.execute(
                select(LabelParent.label_id, LabelParent.parent_id)
                .where(LabelParent.label_id.in_([r.id for r in fine]))):
            links.setdefault(label_id, set()).add(parent_id)
    for i, row in enumerate(fine):
        want = {coarse[c].id for c in tax.parents[i]}
        if links.get(row.id, set()) != want:
            raise TaxonomyMismatch(
                f"taxonomy {tax.name!r}: fine label {row.name!r} has a different coarse parent in the catalog; {hint}"
            )


# --- taxonomy as data: apply a taxonomy file to the catalog, show what the catalog holds ---------------

NAME_MAX = 64  # style_labels.taxonomy and style_labels.name are VARCHAR(64)
# Truth rows an importer wrote (and may replace); any other source is a person's and is kept.
IMPORT_SOURCES = ("import", "fashion-mnist")


class TaxonomyChangeRefused(StyletagError):
    """Applying a taxonomy would remove labels that existing tags or truth labels use."""


@dataclass(frozen=True)
class CatalogTaxonomy:
    """A taxonomy as the catalog holds it: label names per level in position order, their ids, and each
    fine label's coarse parents (all of them)."""

    name: str
    labels: dict[str, list[str]]
    ids: dict[tuple[str, str], int]
    parents: dict[str, list[str]]

    @property
    def multi_label(self) -> bool:
        """Inferred: the catalog does not store the flag; a fine label with several parents implies it."""
        return any(len(p) > 1 for p in self.parents.values())

    def to_dict(self) -> dict:
        """The taxonomy file format (``model.taxonomy``) plus the optional ``colour`` level: what
        ``styletag taxonomy apply`` takes, so that show -> apply changes nothing."""
        multi = self.multi_label
        levels: dict = {
            "coarse": {"multi_label": multi, "labels": list(self.labels.get("coarse", []))},
            "fine": {"multi_label": multi, "labels": [{"name": n, "parents": list(self.parents.get(n, []))}
                                                      for n in self.labels.get("fine", [])]},
        }
        if self.labels.get("colour"):
            levels["colour"] = {"multi_label": True, "labels": list(self.labels["colour"])}
        return {"name": self.name, "levels": levels}


def taxonomy_names(session: Session) -> list[str]:
    return list(session.scalars(select(StyleLabel.taxonomy).distinct().order_by(StyleLabel.taxonomy)))


def read_taxonomy(session: Session, name: str) -> CatalogTaxonomy:
    """The catalog's labels of taxonomy ``name``; NotFound (naming the known ones) when it has none."""
    rows = _rows(session, name)
    if not rows:
        known = ", ".join(taxonomy_names(session)) or "none"
        raise NotFound(f"no taxonomy {name!r} in the catalog (known: {known}); "
                       "apply it with 'styletag taxonomy apply FILE.json'")
    labels: dict[str, list[str]] = {}
    for r in rows:
        labels.setdefault(r.level, []).append(r.name)
    ids = {(r.level, r.name): r.id for r in rows}
    names = {r.id: r.name for r in rows}
    parents: dict[str, list[str]] = {}
    links = session.execute(
        select(LabelParent.label_id, LabelParent.parent_id).where(LabelParent.label_id.in_(list(names)))
    ).all()
    position = {r.id: r.position for r in rows}
    for label_id, parent_id in sorted(links, key=lambda link: position.get(link[1], 0)):
        if parent_id in names:
            parents.setdefault(names[label_id], []).append(names[parent_id])
    return CatalogTaxonomy(name=name, labels=labels, ids=ids, parents=parents)


def parse_taxonomy(data: dict) -> tuple[Taxonomy, list[str] | None]:
    """A taxonomy file's content: the model's taxonomy (coarse, fine with parents) and the colour level's
    names (None when the file has no colour level: the catalog's colour labels are then left alone)."""
    if not isinstance(data, dict) or not isinstance(data.get("levels"), dict):
        raise TaxonomyError("a taxonomy file is a JSON object with 'name' and 'levels'")
    levels = dict(data["levels"])
    colour = levels.pop("colour", None)
    tax = Taxonomy.from_dict({**data, "levels": levels})
    colours = None
    if colour is not None:
        raw = colour.get("labels") if isinstance(colour, dict) else None
        if not isinstance(raw, list) or not all(isinstance(c, str) and c.strip() for c in raw):
            raise TaxonomyError(f"taxonomy {tax.name!r}: level 'colour' needs 'labels', a list of names")
        if len(set(raw)) != len(raw):
            raise TaxonomyError(f"taxonomy {tax.name!r}: duplicate colour label")
        colours = list(raw)
    too_long = [n for n in (tax.name, *tax.coarse.labels, *tax.fine.labels, *(colours or ())) if len(n) > NAME_MAX]
    if too_long:
        raise TaxonomyError(f"taxonomy {tax.name[:80]!r}: name {too_long[0][:80]!r} is longer than {NAME_MAX} "
                            "characters")
    return tax, colours


@dataclass
class TaxonomyChange:
    """What ``apply_taxonomy`` changed (or, refused, would have changed)."""

    taxonomy: str
    created: bool = False
    added: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    reparented: list[str] = field(default_factory=list)
    reordered: int = 0  # labels whose position changed
    orphaned: dict[str, int] = field(default_factory=dict)  # tags / truth / shadow rows / products removed with them
    active_models: list[str] = field(default_factory=list)  # active models of this taxonomy whose labels changed

    @property
    def changed(self) -> bool:
        return bool(self.created or any(self.added.values()) or any(self.removed.values()) or self.reparented
                    or self.reordered)

    def as_dict(self) -> dict:
        return {**self.__dict__, "changed": self.changed}


def _orphans(session: Session, label_ids: list[int]) -> dict[str, int]:
    from sqlalchemy import func, union

    from catalog.schema import ProductStyle, ShadowTag, StyleTruth

    if not label_ids:
        return {"tags": 0, "truth": 0, "shadow": 0, "products": 0}

    def count(model) -> int:
        return int(session.scalar(select(func.count()).select_from(model).where(model.label_id.in_(label_ids))))

    products = union(*(select(m.product_id).where(m.label_id.in_(label_ids))
                       for m in (ProductStyle, StyleTruth, ShadowTag))).subquery()
    return {"tags": count(ProductStyle), "truth": count(StyleTruth), "shadow": count(ShadowTag),
            "products": int(session.scalar(select(func.count()).select_from(products)))}


def apply_taxonomy(session: Session, data: dict, *, force: bool = False) -> TaxonomyChange:
    """Make the catalog's labels of the file's taxonomy what the file says, in the caller's transaction:
    labels added, removed, re-ordered (positions follow the file) and re-parented (every parent kept).
    Removing labels that tags, truth labels or shadow tags use would orphan them: refused, with the
    counts, unless ``force`` (then they go with their labels). Applying the same file twice changes nothing."""
    from sqlalchemy import delete, update

    from catalog.schema import ModelVersion

    tax, colours = parse_taxonomy(data)
    want: dict[str, list[str]] = {"coarse": list(tax.coarse.labels), "fine": list(tax.fine.labels)}
    if colours is not None:
        want["colour"] = colours
    if session.get_bind().dialect.name == "postgresql":  # two applies of one taxonomy at once: one waits
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": f"styletag-taxonomy:{tax.name}"})
    rows = _rows(session, tax.name)
    change = TaxonomyChange(taxonomy=tax.name, created=not rows)
    have = {(r.level, r.name): r for r in rows}
    gone = [r for (level, name), r in have.items() if level in want and name not in want[level]]
    for r in gone:
        change.removed.setdefault(r.level, []).append(r.name)
    change.orphaned = _orphans(session, [r.id for r in gone])
    if any(change.orphaned[k] for k in ("tags", "truth", "shadow")) and not force:
        o = change.orphaned
        names = ", ".join(f"{r.level} {r.name!r}" for r in gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5
                                                                          else "")
        raise TaxonomyChangeRefused(
            f"applying taxonomy {tax.name!r} would remove {names}, orphaning {o['tags']} tags, {o['truth']} truth "
            f"labels and {o['shadow']} shadow tags of {o['products']} products; nothing changed (use --force to "
            "remove them with their tags)")
    if gone:
        session.execute(delete(StyleLabel).where(StyleLabel.id.in_([r.id for r in gone])))
    new_rows = []
    for level, names in want.items():
        for i, name in enumerate(names):
            row = have.get((level, name))
            if row is None:
                change.added.setdefault(level, []).append(name)
                new_rows.append({"taxonomy": tax.name, "level": level, "name": name, "position": i})
            elif row.position != i:
                change.reordered += 1
                session.execute(update(StyleLabel).where(StyleLabel.id == row.id).values(position=i))
    if new_rows:
        session.execute(dialect_insert(session, StyleLabel).on_conflict_do_nothing(), new_rows)
    ids = {(r.level, r.name): r.id for r in _rows(session, tax.name)}
    fine_ids = [ids[("fine", n)] for n in tax.fine.labels]
    links = set(session.execute(select(LabelParent.label_id, LabelParent.parent_id)
                                .where(LabelParent.label_id.in_(fine_ids))).all())
    wanted = {(ids[("fine", n)], ids[("coarse", tax.coarse.labels[c])])
              for f, n in enumerate(tax.fine.labels) for c in tax.parents[f]}
    stale, missing = links - wanted, wanted - links
    for label_id, parent_id in stale:
        session.execute(delete(LabelParent).where(LabelParent.label_id == label_id,
                                                  LabelParent.parent_id == parent_id))
    if missing:
        session.execute(dialect_insert(session, LabelParent).on_conflict_do_nothing(),
                        [{"label_id": a, "parent_id": b} for a, b in sorted(missing)])
    existing = {label_id for label_id, _ in links}
    by_id = {v: k[1] for k, v in ids.items()}
    change.reparented = sorted({by_id[a] for a, _ in stale | missing if a in existing})
    for level in change.removed:
        change.removed[level].sort()
    hierarchy_changed = any(change.added.get(lv) or change.removed.get(lv) for lv in ("coarse", "fine")) or bool(
        change.reparented) or change.reordered
    if hierarchy_changed and not change.created:
        change.active_models = list(session.scalars(
            select(ModelVersion.version).where(ModelVersion.taxonomy == tax.name, ModelVersion.status == "active")))
    session.flush()
    return change


def sync_colour_labels(session: Session, taxonomy: str, names: list[str]) -> None:
    """Add the colour labels of ``names`` missing from ``taxonomy`` (after the existing ones); never removes
    one. Idempotent and safe against a concurrent importer (ON CONFLICT DO NOTHING)."""
    have = [r for r in _rows(session, taxonomy) if r.level == "colour"]
    known = {r.name for r in have}
    start = max((r.position for r in have), default=-1) + 1
    rows = [{"taxonomy": taxonomy, "level": "colour", "name": n, "position": start + i}
            for i, n in enumerate(n for n in names if n not in known)]
    if rows:
        session.execute(dialect_insert(session, StyleLabel).on_conflict_do_nothing(), rows)


def label_usage(session: Session, taxonomy: str) -> dict[int, dict[str, int]]:
    """Per label id of ``taxonomy``: published tags and truth labels that use it (``taxonomy show``)."""
    from sqlalchemy import func

    from catalog.schema import ProductStyle, StyleTruth

    ids = select(StyleLabel.id).where(StyleLabel.taxonomy == taxonomy)
    out: dict[int, dict[str, int]] = {}
    for key, model, where in (("tags", ProductStyle, ProductStyle.published), ("truth", StyleTruth, True)):
        for label_id, n in session.execute(select(model.label_id, func.count()).where(model.label_id.in_(ids), where)
                                           .group_by(model.label_id)):
            out.setdefault(label_id, {})[key] = int(n)
    return out


def other_labelled_taxonomy(session: Session, served: str) -> str | None:
    """A taxonomy whose labels the catalog's products carry (``style_truth``) when ``served`` has none: the
    sign that a retag is about to tag a shop's catalog with another taxonomy's model (the Fashion-MNIST
    bootstrap before the shop's own model is activated). None when the served taxonomy has truth labels, or
    nothing has any. One quick query in the common case (the first truth row found is the served taxonomy's)."""
    from catalog.schema import StyleTruth

    def first(*where) -> str | None:
        return session.scalars(select(StyleLabel.taxonomy).join(StyleTruth, StyleTruth.label_id == StyleLabel.id)
                               .where(*where).limit(1)).first()

    found = first()
    if found is None or found == served:
        return None
    return None if first(StyleLabel.taxonomy == served) is not None else found
