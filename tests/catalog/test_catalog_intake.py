"""A shop's catalog in: ``styletag import catalog`` (CSV and JSON Lines) through the real entry point, on
SQLite and PostgreSQL: idempotence, every rejection reason with its line, --strict, --archive-missing,
the Python API (upsert_products / archive_products), and a photo replaced behind an unchanged URI noticed
by the image check that ``retag --changed-only`` runs first."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from catalog.db import session_scope
from catalog.schema import Product, ProductStyle, StyleLabel, StyleTruth
from catalog.settings import Settings
from catalog.storage import open_store
from tests.support.cli import run_styletag

CDN = "https://cdn.example.com/shop/"


@dataclass
class Shop:
    url: str
    store_dir: Path
    env: dict

    @property
    def store(self):
        return open_store(self.store_dir.as_uri())

    def photo(self, name: str, data: bytes | None = None) -> str:
        """Put a photo into the store; its URI."""
        self.store.put(name, data if data is not None else f"photo {name}".encode())
        return self.store.uri_for(name)

    def settings(self) -> Settings:
        return Settings.from_env()


@pytest.fixture
def shop(db_url, tmp_path, monkeypatch) -> Shop:
    from catalog.labels import apply_taxonomy, sync_colour_labels
    from model.taxonomy import load_taxonomy

    store_dir = tmp_path / "images"
    store_dir.mkdir()
    env = {"STYLETAG_DATABASE_URL": db_url, "STYLETAG_HOME": str(tmp_path / "home"),
           "STYLETAG_STORE_URL": store_dir.as_uri(),
           "STYLETAG_ALLOWED_IMAGE_PREFIXES": f"{store_dir.as_uri()}/,{CDN}", "STYLETAG_FETCH_THREADS": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with session_scope(db_url) as s:
        apply_taxonomy(s, load_taxonomy("fashion-mnist").to_dict())
        sync_colour_labels(s, "fashion-mnist", ["navy", "white", "red"])
    return Shop(db_url, store_dir, env)


@pytest.fixture
def styletag(capsys, monkeypatch):
    """The real entry point (worker.cli.main) in this process; stdin as given. (code, stdout, stderr)."""
    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return run_styletag(capsys, *args, stdin=stdin, monkeypatch=monkeypatch)

    return run


def products(url: str) -> dict[str, tuple]:
    with session_scope(url) as s:
        rows = s.execute(select(Product.sku, Product.title, Product.image_uri, Product.image_version,
                                Product.archived_at, Product.updated_at)).all()
    return {r.sku: tuple(r[1:]) for r in rows}


def truth(url: str) -> dict[str, set[tuple[str, str, str]]]:
    with session_scope(url) as s:
        rows = s.execute(select(Product.sku, StyleLabel.level, StyleLabel.name, StyleTruth.source)
                         .join(StyleTruth, StyleTruth.product_id == Product.id)
                         .join(StyleLabel, StyleLabel.id == StyleTruth.label_id)).all()
    out: dict[str, set] = {}
    for sku, level, name, source in rows:
        out.setdefault(sku, set()).add((level, name, source))
    return out


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_import_records_versions_and_labels_and_a_second_run_changes_nothing(shop, styletag, tmp_path):
    uris = [shop.photo(f"p{i}.jpg") for i in range(4)]
    csv = write_csv(tmp_path / "catalog.csv", [
        "sku,title,image_uri,label:fine,label:colour,price",
        f"A-1,Navy sneaker,{uris[0]},sneaker,navy,10",
        f"A-2,\"Coat, red\",{uris[1]},coat,red|white,20",
        f"A-3,,{uris[2]},,,30",
        f"A-4,Dress,{uris[3]},dress,,40",
    ])
    first = styletag("import", "catalog", str(csv), "--taxonomy", "fashion-mnist", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["rows"], report["inserted"], report["updated"], report["unchanged"], report["rejected"]) == (
        4, 4, 0, 0, 0)
    assert report["warnings"] == ["ignored columns: price"]
    rows = products(shop.url)
    assert rows["A-2"][:2] == ("Coat, red", uris[1]) and rows["A-3"][0] == ""
    for sku, uri in zip(("A-1", "A-2", "A-3", "A-4"), uris, strict=True):
        assert rows[sku][2] == shop.store.head(uri).version  # the version of the image the import saw
    assert truth(shop.url) == {
        "A-1": {("fine", "sneaker", "import"), ("coarse", "shoes", "import"), ("colour", "navy", "import")},
        "A-2": {("fine", "coat", "import"), ("coarse", "outerwear", "import"), ("colour", "red", "import"),
                ("colour", "white", "import")},
        "A-4": {("fine", "dress", "import"), ("coarse", "dresses", "import")},
    }
    assert report["truth_added"] == 9

    again = styletag("import", "catalog", str(csv), "--taxonomy", "fashion-mnist")
    assert again.returncode == 0, again.stderr
    assert "4 rows: 0 inserted, 0 updated, 4 unchanged, 0 archived, 0 rejected; truth labels +0 -0" in again.stdout
    assert products(shop.url) == rows  # not even updated_at moved


def test_jsonl_from_stdin_updates_what_changed(shop, styletag):
    a, b = shop.photo("a.jpg"), shop.photo("b.jpg")
    lines = [{"sku": "J-1", "image_uri": a, "title": "one", "labels": {"fine": "sneaker"}},
             {"sku": "J-2", "image_uri": b, "labels": {"fine": ["shirt"], "colour": ["navy", "white"]}}]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    first = styletag("import", "catalog", "-", "--taxonomy", "fashion-mnist", "--json", stdin=data)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["inserted"] == 2
    lines[0]["title"] = "one, renamed"
    lines[1]["labels"] = {"fine": "t-shirt/top", "colour": "navy"}
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    second = json.loads(styletag("import", "catalog", "-", "--taxonomy", "fashion-mnist", "--json",
                                 stdin=data).stdout)
    assert (second["inserted"], second["updated"], second["unchanged"]) == (0, 1, 1)
    assert (second["truth_added"], second["truth_removed"]) == (1, 2)  # shirt -> t-shirt/top, white gone
    assert products(shop.url)["J-1"][0] == "one, renamed"
    assert truth(shop.url)["J-2"] == {("fine", "t-shirt/top", "import"), ("coarse", "tops", "import"),
                                      ("colour", "navy", "import")}


def test_every_rejection_reason_with_its_line(shop, styletag, tmp_path):
    ok = shop.photo("ok.jpg")
    lines = [
        "sku,title,image_uri,label:coarse,label:fine",  # 1
        f"GOOD-1,fine,{ok},,sneaker",  # 2
        f",no sku,{ok},,",  # 3 no_sku
        f"{'S' * 129},too long,{ok},,",  # 4 sku_too_long
        f"BELL\x07,control,{ok},,",  # 5 bad_sku
        f"GOOD-1,again,{ok},,",  # 6 duplicate_sku
        "NOURI,no uri,,,",  # 7 no_image_uri
        "ETC,outside,file:///etc/passwd,,",  # 8 forbidden_uri
        f"DOTS,dots,{shop.store_dir.as_uri()}/../x.jpg,,",  # 9 forbidden_uri
        f"LONG,{'t' * 513},{ok},,",  # 10 title_too_long
        f"LABEL,unknown,{ok},,hoodie",  # 11 unknown_label
        f"MIXED,contradiction,{ok},tops,sneaker",  # 12 bad_labels
        "BYTES,@@,file:///x.jpg,,",  # 13 invalid_utf8 (patched below)
        f"FIELDS,one too many,{ok},,,extra",  # 14 bad_row
        f"GOOD-2,on the CDN,{CDN}img/2.jpg,,",  # 15 https within the prefixes
        f"GOOD-3,\"a title\nover two lines\",{ok},bags,bag",  # 16-17
        f"GOOD-4,after,{ok},,",  # 18
    ]
    raw = ("\n".join(lines) + "\n").encode().replace(b"@@", b"caf\xe9")
    path = tmp_path / "bad.csv"
    path.write_bytes(raw)
    rejects = tmp_path / "rejects.csv"
    out = styletag("import", "catalog", str(path), "--taxonomy", "fashion-mnist", "--skip-image-check",
                   "--rejects", str(rejects), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    got = [(r["line"], r["reason"]) for r in report["rejections"]]
    assert got == [(3, "no_sku"), (4, "sku_too_long"), (5, "bad_sku"), (6, "duplicate_sku"), (7, "no_image_uri"),
                   (8, "forbidden_uri"), (9, "forbidden_uri"), (10, "title_too_long"), (11, "unknown_label"),
                   (12, "bad_labels"), (13, "invalid_utf8"), (14, "bad_row")]
    assert "on line 2 already" in report["rejections"][3]["message"]
    assert sorted(products(shop.url)) == ["GOOD-1", "GOOD-2", "GOOD-3", "GOOD-4"]
    assert products(shop.url)["GOOD-3"][0] == "a title\nover two lines"
    assert rejects.read_text().splitlines()[0] == "line,sku,reason,message"
    assert len(rejects.read_text().splitlines()) == 13
    # the human form: one line per rejection on stderr, never a traceback
    human = styletag("import", "catalog", str(path), "--taxonomy", "fashion-mnist", "--skip-image-check")
    assert human.returncode == 0 and "Traceback" not in human.stderr
    assert "rejected: line 13: invalid_utf8: not UTF-8 (byte 10 of the line" in human.stderr
    assert "0 inserted, 0 updated, 4 unchanged, 0 archived, 12 rejected" in human.stdout


def test_jsonl_rejections(shop, styletag, tmp_path):
    ok = shop.photo("ok.jpg")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([
        json.dumps({"sku": "OK-1", "image_uri": ok}).encode(),  # 1
        b'{"sku": "broken", ',  # 2
        b'["not", "an", "object"]',  # 3
        b'{"sku": "caf\xe9", "image_uri": "x"}',  # 4
        json.dumps({"sku": "LEVEL", "image_uri": ok, "labels": {"size": "xl"}}).encode(),  # 5
        json.dumps({"sku": 7, "image_uri": ok, "title": ["a", "list"]}).encode(),  # 6
        b"",  # 7 blank: skipped
        json.dumps({"sku": "OK-2", "image_uri": ok, "labels": {"fine": "bag"}}).encode(),  # 8
    ]) + b"\n")
    report = json.loads(styletag("import", "catalog", str(path), "--taxonomy", "fashion-mnist", "--json").stdout)
    assert [(r["line"], r["reason"]) for r in report["rejections"]] == [
        (2, "bad_row"), (3, "bad_row"), (4, "invalid_utf8"), (5, "unknown_label"), (6, "bad_row")]
    assert report["inserted"] == 2


def test_label_columns_need_a_taxonomy_that_has_their_level(shop, styletag, tmp_path):
    csv = write_csv(tmp_path / "c.csv", ["sku,image_uri,label:fine", f"X,{shop.photo('x.jpg')},sneaker"])
    out = styletag("import", "catalog", str(csv))
    assert out.returncode == 1 and "--taxonomy" in out.stderr and "Traceback" not in out.stderr
    csv = write_csv(tmp_path / "d.csv", ["sku,image", f"X,{shop.photo('x.jpg')}"])
    out = styletag("import", "catalog", str(csv))
    assert out.returncode == 1 and "no 'image_uri' column" in out.stderr
    assert products(shop.url) == {}


def test_strict_writes_nothing(shop, styletag, tmp_path):
    ok = shop.photo("ok.jpg")
    lines = ["sku,image_uri"] + [f"S-{i},{ok}" for i in range(7)] + ["S-bad,s3://elsewhere/x.jpg"]
    csv = write_csv(tmp_path / "c.csv", lines)
    out = styletag("import", "catalog", str(csv), "--strict", "--batch-size", "2")
    assert out.returncode == 1
    assert "1 rows rejected, nothing was written (strict): line 9: forbidden_uri" in out.stderr
    assert products(shop.url) == {}
    out = styletag("import", "catalog", str(csv), "--batch-size", "2", "--json")
    assert json.loads(out.stdout)["inserted"] == 7


def _tag(url: str, sku: str, level: str = "fine", name: str = "sneaker") -> None:
    """A published model tag, as a worker would have written it."""
    with session_scope(url) as s:
        pid = s.scalar(select(Product.id).where(Product.sku == sku))
        lid = s.scalar(select(StyleLabel.id).where(StyleLabel.level == level, StyleLabel.name == name))
        s.add(ProductStyle(product_id=pid, label_id=lid, score=0.9, is_primary=True, model_version="m1"))


def _storefront_skus(url: str) -> set[str]:
    with session_scope(url) as s:
        return set(s.scalars(text("SELECT DISTINCT sku FROM storefront_tags")))


def test_archive_missing_hides_and_skips_and_a_reimport_brings_back(shop, styletag, tmp_path):
    from catalog import runs

    ok = shop.photo("ok.jpg")
    full = write_csv(tmp_path / "full.csv", ["sku,image_uri"] + [f"K-{i},{ok}" for i in range(4)])
    assert styletag("import", "catalog", str(full)).returncode == 0
    for i in range(4):
        _tag(shop.url, f"K-{i}")
    assert _storefront_skus(shop.url) == {"K-0", "K-1", "K-2", "K-3"}

    part = write_csv(tmp_path / "part.csv", ["sku,image_uri", f"K-0,{ok}", f"K-2,{ok}"])
    out = json.loads(styletag("import", "catalog", str(part), "--archive-missing", "--json").stdout)
    assert (out["archived"], out["unchanged"]) == (2, 2)
    rows = products(shop.url)
    assert len(rows) == 4 and {s for s, r in rows.items() if r[3] is not None} == {"K-1", "K-3"}  # nothing deleted
    assert _storefront_skus(shop.url) == {"K-0", "K-2"}
    with session_scope(shop.url) as s:
        run = runs.create_run(s, kind="manual", scope="all", model_version="m2")
        assert runs.count_products_to_tag(s, run) == 2  # archived products are never in a run
        assert s.scalar(select(func.count()).select_from(ProductStyle)) == 4  # tags kept
    again = json.loads(styletag("import", "catalog", str(part), "--archive-missing", "--json").stdout)
    assert (again["archived"], again["unchanged"]) == (0, 2)

    back = json.loads(styletag("import", "catalog", str(full), "--json").stdout)
    assert (back["updated"], back["unarchived"], back["unchanged"]) == (2, 2, 2)
    assert all(r[3] is None for r in products(shop.url).values())
    assert _storefront_skus(shop.url) == {"K-0", "K-1", "K-2", "K-3"}


def test_archive_missing_archives_nothing_when_a_rejected_line_may_name_a_product(shop, styletag, tmp_path):
    ok = shop.photo("ok.jpg")
    assert styletag("import", "catalog", str(write_csv(tmp_path / "a.csv", ["sku,image_uri", f"Z-1,{ok}",
                                                                          f"Z-2,{ok}"]))).returncode == 0
    path = tmp_path / "b.csv"
    path.write_bytes(f"sku,image_uri\nZ-1,{ok}\n".encode() + b"Z-2\xff,x\n")
    out = json.loads(styletag("import", "catalog", str(path), "--archive-missing", "--json").stdout)
    assert out["archived"] == 0 and any("nothing archived" in w for w in out["warnings"])
    assert all(r[3] is None for r in products(shop.url).values())
    empty = write_csv(tmp_path / "e.csv", ["sku,image_uri"])
    out = styletag("import", "catalog", str(empty), "--archive-missing")
    assert out.returncode == 1 and "would archive the whole catalog" in out.stderr
    assert all(r[3] is None for r in products(shop.url).values())


def test_python_api_upsert_and_archive(shop):
    from catalog.errors import NotFound
    from catalog.products import RowsRejected, archive_products, upsert_products

    uri = shop.photo("api.jpg")
    report = upsert_products([{"sku": "API-1", "image_uri": uri, "title": "t"}, {"sku": "API-2", "image_uri": uri}],
                             want_ids=True)
    assert report.inserted == 2 and set(report.ids) == {"API-1", "API-2"}
    with pytest.raises(RowsRejected, match="image_unreadable"):
        upsert_products([{"sku": "API-3", "image_uri": uri},
                         {"sku": "API-4", "image_uri": shop.store.uri_for("nope.jpg")}],
                        strict=True, require_images=True)
    assert set(products(shop.url)) == {"API-1", "API-2"}  # API-3 was fine, but nothing was written
    with pytest.raises(NotFound, match="nope"):
        archive_products(["API-1", "nope"])
    assert archive_products(["API-1"]) == 1 and archive_products(["API-1"]) == 0
    assert products(shop.url)["API-1"][3] is not None


def test_replaced_photo_and_plain_sql_rows_are_noticed_by_the_image_check(shop, styletag, tmp_path):
    """``retag --changed-only`` runs this check first: a photo replaced at the same URI gets a new version in
    the catalog, and the run picks the product up; a row inserted by plain SQL gets its first version."""
    from catalog import runs
    from catalog.products import refresh_image_versions

    uri = shop.photo("same.jpg", b"first photo")
    csv = write_csv(tmp_path / "c.csv", ["sku,image_uri", f"R-1,{uri}"])
    assert styletag("import", "catalog", str(csv)).returncode == 0
    with session_scope(shop.url) as s:
        s.execute(text("INSERT INTO products (sku, image_uri) VALUES ('SQL-1', :u)"), {"u": uri})
        for sku in ("R-1", "SQL-1"):  # as a worker leaves it: tagged with the version it read
            pid, version = s.execute(select(Product.id, Product.image_version).where(Product.sku == sku)).one()
            s.execute(text("INSERT INTO tag_state (product_id, model_version, image_version, status, attempts, "
                           "updated_at) VALUES (:p, 'm1', :v, 'tagged', 1, CURRENT_TIMESTAMP)"),
                      {"p": pid, "v": shop.store.head(uri).version})
    assert products(shop.url)["SQL-1"][2] is None

    def changed() -> int:
        with session_scope(shop.url) as s:
            return runs.count_products_to_tag(s, runs.create_run(s, kind="manual", scope="changed",
                                                                 model_version="m1"))

    assert changed() == 1  # SQL-1: the catalog knows no version yet
    first = refresh_image_versions(shop.settings())
    assert (first.checked, first.changed, first.unreadable) == (2, 1, 0)
    assert changed() == 0
    new = shop.store.put("same.jpg", b"a new photo, same URI")  # replaced behind an unchanged URI
    assert changed() == 0  # the catalog cannot know without looking
    check = refresh_image_versions(shop.settings())
    assert (check.checked, check.changed) == (2, 2)
    assert {r[2] for r in products(shop.url).values()} == {new.version}
    assert changed() == 2
    assert refresh_image_versions(shop.settings()).changed == 0
    # the importer notices the same: the version it reads is the new one
    shop.store.put("same.jpg", b"and a third photo")
    out = json.loads(styletag("import", "catalog", str(csv), "--json").stdout)
    assert (out["updated"], out["unchanged"]) == (1, 0)
