"""Taxonomy as data: ``styletag taxonomy apply FILE.json`` / ``show``, on SQLite and PostgreSQL. A label with
several parents is stored with all of them; a change that would orphan tags is refused with the counts
unless --force; applying what ``show --json`` printed changes nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
from sqlalchemy import func, select

from catalog.db import session_scope
from catalog.schema import LabelParent, Product, ProductStyle, StyleLabel, StyleTruth
from tests.support.cli import run_styletag

SHOP = {
    "name": "shop-2027",
    "levels": {
        "coarse": {"multi_label": True, "labels": ["casual", "formal", "sport"]},
        "fine": {"multi_label": True, "labels": [
            {"name": "sneaker", "parents": ["sport", "casual"]},
            {"name": "loafer", "parents": ["formal", "casual"]},
            {"name": "blazer", "parents": ["formal"]},
        ]},
        "colour": {"labels": ["black", "navy"]},
    },
}


@pytest.fixture
def styletag(db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STYLETAG_DATABASE_URL", db_url)
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path / "home"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_styletag(capsys, *args)

    return run


def write(tmp_path, data: dict, name: str = "tax.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def parents(url: str, taxonomy: str) -> dict[str, set[str]]:
    with session_scope(url) as s:
        child = select(StyleLabel.id, StyleLabel.name).where(StyleLabel.taxonomy == taxonomy).subquery()
        rows = s.execute(select(child.c.name, StyleLabel.name)
                         .join(LabelParent, LabelParent.label_id == child.c.id)
                         .join(StyleLabel, StyleLabel.id == LabelParent.parent_id)).all()
    out: dict[str, set[str]] = {}
    for name, parent in rows:
        out.setdefault(name, set()).add(parent)
    return out


def test_apply_multi_parent_taxonomy_show_and_reapply(styletag, db_url, tmp_path):
    out = styletag("taxonomy", "apply", write(tmp_path, SHOP), "--json")
    assert out.returncode == 0, out.stderr
    change = json.loads(out.stdout)
    assert change["created"] and change["added"] == {"coarse": ["casual", "formal", "sport"],
                                                     "fine": ["sneaker", "loafer", "blazer"],
                                                     "colour": ["black", "navy"]}
    assert parents(db_url, "shop-2027") == {"sneaker": {"sport", "casual"}, "loafer": {"formal", "casual"},
                                            "blazer": {"formal"}}
    shown = styletag("taxonomy", "show", "shop-2027", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["levels"]["fine"]["labels"][0] == {"name": "sneaker", "parents": ["casual", "sport"]}
    assert data["levels"]["coarse"]["multi_label"] is True and data["levels"]["colour"]["labels"] == ["black", "navy"]
    again = styletag("taxonomy", "apply", write(tmp_path, data, "shown.json"))
    assert again.returncode == 0 and again.stdout.strip() == "taxonomy shop-2027: unchanged"
    text = styletag("taxonomy", "show").stdout
    assert "shop-2027 (multi-label)" in text and "casual, sport" in text


def test_import_implies_every_parent_of_a_multi_parent_label(styletag, db_url, tmp_path, monkeypatch):
    from catalog.storage import open_store

    assert styletag("taxonomy", "apply", write(tmp_path, SHOP)).returncode == 0
    store = open_store((tmp_path / "img").as_uri())
    store.put("s.jpg", b"x")
    monkeypatch.setenv("STYLETAG_STORE_URL", store.url)
    csv = tmp_path / "c.csv"
    csv.write_text(f"sku,image_uri,label:fine,label:colour\nS-1,{store.uri_for('s.jpg')},sneaker,navy\n")
    out = styletag("import", "catalog", str(csv), "--taxonomy", "shop-2027", "--json")
    assert out.returncode == 0, out.stderr
    with session_scope(db_url) as s:
        got = set(s.execute(select(StyleLabel.level, StyleLabel.name).join(StyleTruth)).all())
    assert got == {("fine", "sneaker"), ("coarse", "sport"), ("coarse", "casual"), ("colour", "navy")}


def _use(url: str, taxonomy: str, name: str) -> None:
    """A product with a model tag and a truth label on ``name``."""
    with session_scope(url) as s:
        p = Product(sku=f"uses-{name}", title="", image_uri="file:///x.jpg")
        s.add(p)
        s.flush()
        lid = s.scalar(select(StyleLabel.id).where(StyleLabel.taxonomy == taxonomy, StyleLabel.name == name))
        s.add(ProductStyle(product_id=p.id, label_id=lid, score=0.8, is_primary=True, model_version="m"))
        s.add(StyleTruth(product_id=p.id, label_id=lid, source="import"))


def test_a_change_that_would_orphan_tags_is_refused_unless_forced(styletag, db_url, tmp_path):
    assert styletag("taxonomy", "apply", write(tmp_path, SHOP)).returncode == 0
    _use(db_url, "shop-2027", "loafer")
    smaller = json.loads(json.dumps(SHOP))
    smaller["levels"]["fine"]["labels"] = [lb for lb in smaller["levels"]["fine"]["labels"] if lb["name"] != "loafer"]
    smaller["levels"]["fine"]["labels"][0]["parents"] = ["sport"]  # a re-parenting goes along
    path = write(tmp_path, smaller, "smaller.json")
    refused = styletag("taxonomy", "apply", path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert ("would remove fine 'loafer', orphaning 1 tags, 1 truth labels and 0 shadow tags of 1 products; "
            "nothing changed") in refused.stderr
    assert parents(db_url, "shop-2027")["loafer"] == {"formal", "casual"}  # untouched, re-parenting too
    assert parents(db_url, "shop-2027")["sneaker"] == {"sport", "casual"}
    forced = styletag("taxonomy", "apply", path, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    change = json.loads(forced.stdout)
    assert change["removed"] == {"fine": ["loafer"]} and change["reparented"] == ["sneaker"]
    assert change["orphaned"] == {"tags": 1, "truth": 1, "shadow": 0, "products": 1}
    assert parents(db_url, "shop-2027") == {"sneaker": {"sport"}, "blazer": {"formal"}}
    with session_scope(db_url) as s:
        assert s.scalar(select(func.count()).select_from(ProductStyle)) == 0
        assert s.scalar(select(func.count()).select_from(Product)) == 1  # the product stays
        positions = s.execute(select(StyleLabel.name, StyleLabel.position)
                              .where(StyleLabel.taxonomy == "shop-2027", StyleLabel.level == "fine")).all()
    assert sorted(positions, key=lambda r: r[1]) == [("sneaker", 0), ("blazer", 1)]


def test_unused_labels_go_without_force_and_a_file_without_colours_keeps_them(styletag, db_url, tmp_path):
    assert styletag("taxonomy", "apply", write(tmp_path, SHOP)).returncode == 0
    changed = json.loads(json.dumps(SHOP))
    changed["levels"]["fine"]["labels"].append({"name": "hoodie", "parents": ["casual"]})
    changed["levels"]["coarse"]["labels"].remove("sport")
    changed["levels"]["fine"]["labels"][0]["parents"] = ["casual"]
    del changed["levels"]["colour"]
    out = styletag("taxonomy", "apply", write(tmp_path, changed), "--json")
    assert out.returncode == 0, out.stderr
    change = json.loads(out.stdout)
    assert change["added"] == {"fine": ["hoodie"]} and change["removed"] == {"coarse": ["sport"]}
    with session_scope(db_url) as s:
        colours = s.scalars(select(StyleLabel.name).where(StyleLabel.level == "colour")).all()
    assert sorted(colours) == ["black", "navy"]


def test_bad_taxonomy_files_are_one_line_errors(styletag, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = styletag("taxonomy", "apply", str(bad))
    assert out.returncode != 0 and out.stderr.startswith("error: taxonomy file") and "Traceback" not in out.stderr
    data = json.loads(json.dumps(SHOP))
    data["levels"]["fine"]["labels"][0]["parents"] = ["nowhere"]
    out = styletag("taxonomy", "apply", write(tmp_path, data))
    assert out.returncode != 0 and "unknown parent 'nowhere'" in out.stderr
    out = styletag("taxonomy", "show", "nope")
    assert out.returncode == 2 and "no taxonomy 'nope'" in out.stderr
