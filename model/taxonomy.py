"""Two-level style taxonomies (coarse, fine), loaded from JSON and validated.

File format::

    {"name": "fashion-mnist",
     "levels": {"coarse": {"multi_label": false, "labels": ["tops", ...]},
                "fine":   {"multi_label": false,
                           "labels": [{"name": "t-shirt/top", "parents": ["tops"]}, ...]}}}

A fine label names one parent (single-label) or several (multi-label taxonomies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import TaxonomyError

__all__ = ["Level", "Taxonomy", "TaxonomyError", "load_taxonomy"]

TAXONOMY_DIR = Path(__file__).parent / "taxonomies"


@dataclass(frozen=True)
class Level:
    name: str
    multi_label: bool
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    name: str
    coarse: Level
    fine: Level
    parents: tuple[tuple[int, ...], ...]  # parents[f] = indices of fine label f's coarse parents

    @property
    def multi_label(self) -> bool:
        return self.coarse.multi_label or self.fine.multi_label

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.coarse.labels]
        for f, ps in enumerate(self.parents):
            for c in ps:
                kids[c].append(f)
        return tuple(tuple(k) for k in kids)

    def parent_matrix(self) -> list[list[int]]:
        """R[f][c] = 1 when coarse c is a parent of fine f (used by the consistency layers)."""
        return [[1 if c in self.parents[f] else 0 for c in range(len(self.coarse.labels))] for f in range(len(self.fine.labels))]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "levels": {
                "coarse": {"multi_label": self.coarse.multi_label, "labels": list(self.coarse.labels)},
                "fine": {
                    "multi_label": self.fine.multi_label,
                    "labels": [
                        {"name": n, "parents": [self.coarse.labels[c] for c in self.parents[i]]}
                        for i, n in enumerate(self.fine.labels)
                    ],
                },
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> Taxonomy:
        if not isinstance(data, dict):
            raise TaxonomyError("taxonomy must be a JSON object")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise TaxonomyError("taxonomy needs a non-empty 'name'")
        levels = data.get("levels")
        if not isinstance(levels, dict) or set(levels) != {"coarse", "fine"}:
            raise TaxonomyError(f"taxonomy {name!r}: 'levels' must have exactly 'coarse' and 'fine'")
        coarse_raw, fine_raw = levels["coarse"], levels["fine"]
        coarse_names = [str(x) for x in coarse_raw.get("labels", [])]
        _check_names(name, "coarse", coarse_names)
        fine_names: list[str] = []
        parents: list[tuple[int, ...]] = []
        index = {n: i for i, n in enumerate(coarse_names)}
        for item in fine_raw.get("labels", []):
            if not isinstance(item, dict) or "name" not in item:
                raise TaxonomyError(f"taxonomy {name!r}: each fine label needs a 'name' and 'parents'")
            fname = str(item["name"])
            ps = item.get("parents") or ([item["parent"]] if "parent" in item else [])
            if not ps:
                raise TaxonomyError(f"taxonomy {name!r}: fine label {fname!r} names no parent")
            unknown = [p for p in ps if p not in index]
            if unknown:
                raise TaxonomyError(f"taxonomy {name!r}: fine label {fname!r} has unknown parent {unknown[0]!r}")
            fine_multi = bool(fine_raw.get("multi_label", False))
            if len(ps) > 1 and not (fine_multi or coarse_raw.get("multi_label", False)):
                raise TaxonomyError(f"taxonomy {name!r}: fine label {fname!r} has several parents in a single-label taxonomy")
            fine_names.append(fname)
            parents.append(tuple(index[p] for p in ps))
        _check_names(name, "fine", fine_names)
        return cls(
            name=name,
            coarse=Level("coarse", bool(coarse_raw.get("multi_label", False)), tuple(coarse_names)),
            fine=Level("fine", bool(fine_raw.get("multi_label", False)), tuple(fine_names)),
            parents=tuple(parents),
        )


def _check_names(tax: str, level: str, names: list[str]) -> None:
    if not names:
        raise TaxonomyError(f"taxonomy {tax!r}: level {level!r} is empty")
    seen: set[str] = set()
    for n in names:
        if not n.strip():
            raise TaxonomyError(f"taxonomy {tax!r}: level {level!r} has an empty label name")
        if n in seen:
            raise TaxonomyError(f"taxonomy {tax!r}: duplicate {level} label {n!r}")
        seen.add(n)


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """Load a shipped taxonomy by name (``fashion-mnist``) or any JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TAXONOMY_DIR / f"{name_or_path}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in TAXONOMY_DIR.glob("*.json")))
        raise TaxonomyError(f"no taxonomy {str(name_or_path)!r} (shipped: {shipped})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TaxonomyError(f"taxonomy file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    return Taxonomy.from_dict(data)
