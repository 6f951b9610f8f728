"""Brute force for the browse tests: every answer computed again from the storefront view's rows alone
(``storefront_tags``: the published tags), and the stored tag sets recomputed from scratch."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import insert, select, text

from catalog.schema import ProductStyle, StyleLabel

COLOURS = ("black", "white", "navy", "red", "purple")


@dataclass
class Shown:
    sku: str
    title: str
    labels: set = field(default_factory=set)  # (taxonomy, level, style)
    scores: list = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return {style for _, _, style in self.labels}

    @property
    def confidence(self) -> float:
        return round(math.fsum(self.scores) / len(self.scores), 6)


def add_colours(session, taxonomy: str = "fashion-mnist", names=COLOURS) -> dict[str, int]:
    for i, name in enumerate(names):
        session.execute(text("INSERT INTO style_labels (taxonomy, level, name, position) VALUES (:t, 'colour', :n, :i)"),
                        {"t": taxonomy, "n": name, "i": i})
    rows = session.execute(select(StyleLabel.name, StyleLabel.id).where(StyleLabel.level == "colour",
                                                                       StyleLabel.taxonomy == taxonomy))
    return dict(rows.all())


def random_tags(session, ids: list[int], rng: random.Random, published_share: float = 0.9) -> None:
    """Random tags at every level straight into product_styles (0-2 per level, few distinct scores so
    that browse scores tie, a share unpublished), for the sets to be recomputed from."""
    by_level: dict[str, list[int]] = defaultdict(list)
    for lid, level in session.execute(select(StyleLabel.id, StyleLabel.level)):
        by_level[level].append(lid)
    rows = []
    for pid in ids:
        for level in ("coarse", "fine", "colour"):
            for i, lid in enumerate(rng.sample(by_level[level], rng.choice((0, 1, 1, 1, 2)))):
                rows.append({"product_id": pid, "label_id": lid, "score": rng.choice((0.3, 0.5, 0.75, 0.9, 1.0)),
                             "is_primary": i == 0, "model_version": "m1", "published": rng.random() < published_share})
    if rows:
        session.execute(insert(ProductStyle.__table__), rows)


def shown(conn) -> dict[int, Shown]:
    """What the storefront view shows, by product."""
    out: dict[int, Shown] = {}
    for r in conn.execute(text("SELECT product_id, sku, title, taxonomy, level, style, score FROM storefront_tags")):
        p = out.setdefault(r.product_id, Shown(r.sku, r.title))
        p.labels.add((r.taxonomy, r.level, r.style))
        p.scores.append(r.score)
    return out


def positions(conn) -> dict[tuple[str, str, str], int]:
    return {(t, lvl, n): pos for t, lvl, n, pos in conn.execute(
        text("SELECT taxonomy, level, name, position FROM style_labels"))}


def selection(products: dict[int, Shown], names, min_score: float = 0.0) -> list[int]:
    """The selection in browse order: (browse score DESC, product id)."""
    chosen = [(p.confidence, pid) for pid, p in products.items()
              if set(names) <= p.names and p.confidence >= min_score]
    return [pid for _, pid in sorted(chosen, key=lambda c: (-c[0], c[1]))]


def facets(products: dict[int, Shown], pos: dict, names, min_score: float = 0.0) -> dict:
    """facets_within's answer, by brute force."""
    chosen = selection(products, names, min_score)
    levels = ("fine", "colour") if names else ("coarse", "fine", "colour")
    counts = Counter(label for pid in chosen for label in products[pid].labels)
    lists = {level: [] for level in levels}
    for (tax, level, style), n in counts.items():
        if level in lists and style not in names:
            lists[level].append((-n, tax, pos[(tax, level, style)], style))
    return {"styles": list(names), "min_score": min_score, "products": len(chosen),
            "facets": {level: [{"taxonomy": t, "style": s, "count": -n} for n, t, _, s in sorted(items)]
                       for level, items in lists.items()}}


def recomputed(conn) -> dict:
    """The tag-set tables as they must be: computed from the published rows alone."""
    tags: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for pid, lid, score in conn.execute(text("SELECT product_id, label_id, score FROM product_styles WHERE published")):
        tags[pid].append((lid, score))
    members = {pid: (",".join(str(lid) for lid in sorted(lid for lid, _ in rows)),
                     round(math.fsum(s for _, s in rows) / len(rows), 6)) for pid, rows in tags.items()}
    sets = Counter(key for key, _ in members.values())
    pairs = Counter()
    for key, _ in members.values():
        labels = [0, *map(int, key.split(","))]
        pairs.update((a, b) for a in labels for b in labels)
    return {"members": members, "sets": dict(sets), "pairs": dict(pairs)}


def stored(conn) -> dict:
    members = {pid: (key, conf) for pid, key, conf in conn.execute(text(
        "SELECT m.product_id, t.key, m.confidence FROM product_tag_sets m JOIN tag_sets t ON t.id = m.set_id"))}
    sets = {key: n for key, n in conn.execute(text("SELECT key, products FROM tag_sets")) if n}
    pairs = {(a, b): n for a, b, n in conn.execute(text("SELECT label_id, other_id, products FROM label_pairs")) if n}
    links: dict[str, list[int]] = defaultdict(list)
    for key, lid in conn.execute(text("SELECT t.key, x.label_id FROM tag_sets t JOIN tag_set_labels x ON x.set_id = t.id")):
        links[key].append(lid)
    keys = [key for key, in conn.execute(text("SELECT key FROM tag_sets"))]
    bad = [key for key in keys if sorted(links.get(key, [])) != sorted(map(int, key.split(",")))]
    return {"members": members, "sets": sets, "pairs": pairs, "bad_set_labels": bad}


def assert_exact(conn) -> None:
    """The stored sets, memberships and counts equal a recomputation from the published rows."""
    have, want = stored(conn), recomputed(conn)
    assert have.pop("bad_set_labels") == []
    assert have == want
