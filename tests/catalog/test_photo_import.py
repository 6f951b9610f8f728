"""``styletag import fashion-mnist --render photo``: colour product photos in the store, a CSV that
``import catalog`` takes with coarse, fine and colour truth, deterministic per item and split whatever the
number of processes, and idempotent (a second run rewrites no photo and changes no row)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from catalog.db import session_scope
from catalog.schema import Product, StyleLabel, StyleTruth
from catalog.settings import Settings
from model.fmnist import CLASSES, DEFAULT_SOURCE, load_split

pytestmark = pytest.mark.skipif(
    not any((DEFAULT_SOURCE / f"t10k-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz")),
    reason=f"Fashion-MNIST not in {DEFAULT_SOURCE} (apt-get install dataset-fashion-mnist)",
)
N = 6


def _settings(url: str, store: Path) -> Settings:
    return replace(Settings.from_env(), database_url=url, store_url=store.as_uri(),
                   allowed_image_prefixes=(store.as_uri() + "/",))


def test_rendered_photos_csv_truth_and_idempotence(sqlite_url, tmp_path):
    from PIL import Image

    from catalog.importers.photos import render_fashion_mnist_photos

    store = tmp_path / "store"
    settings = _settings(sqlite_url, store)
    out_csv = tmp_path / "photos.csv"
    report = render_fashion_mnist_photos("test", out_csv, settings=settings, limit=N, procs=1, progress=False)
    assert (report.total, report.written, report.kept) == (N, N, 0) and report.photos_per_s > 0
    assert report.imported["inserted"] == N and report.imported["rejected"] == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert list(rows[0]) == ["sku", "title", "image_uri", "image_version", "label:coarse", "label:fine",
                             "label:colour"]
    _, labels = load_split("test")
    for i, row in enumerate(rows):
        assert row["sku"] == f"fmnist-photo-test-{i:05d}" and row["label:fine"] == CLASSES[int(labels[i])]
        path = Path(row["image_uri"].removeprefix("file://"))
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and 600 <= min(img.size) <= max(img.size) <= 1000
            corner = img.getpixel((1, 1))
        assert min(corner) > 120  # a light studio backdrop
        assert 1 <= len(row["label:colour"].split("|")) <= 2
    with session_scope(sqlite_url) as s:
        got = s.execute(select(Product.sku, StyleLabel.level, StyleLabel.name)
                        .join(StyleTruth, StyleTruth.product_id == Product.id)
                        .join(StyleLabel, StyleLabel.id == StyleTruth.label_id)).all()
        versions = dict(s.execute(select(Product.sku, Product.image_version)).all())
    levels: dict[str, dict[str, set[str]]] = {}
    for sku, level, name in got:
        levels.setdefault(sku, {}).setdefault(level, set()).add(name)
    first = rows[0]
    assert levels[first["sku"]] == {"coarse": {first["label:coarse"]}, "fine": {first["label:fine"]},
                                   "colour": set(first["label:colour"].split("|"))}
    assert versions == {r["sku"]: r["image_version"] for r in rows}

    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*.jpg")}
    again = render_fashion_mnist_photos("test", out_csv, settings=settings, limit=N, procs=1, progress=False)
    assert (again.written, again.kept) == (0, N)
    assert (again.imported["inserted"], again.imported["updated"], again.imported["unchanged"]) == (0, 0, N)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.jpg")} == mtimes


def test_a_pool_of_processes_renders_the_same_bytes(sqlite_url, tmp_path):
    from catalog.importers.photos import render_fashion_mnist_photos

    one, two = tmp_path / "one", tmp_path / "two"
    render_fashion_mnist_photos("test", tmp_path / "1.csv", settings=_settings(sqlite_url, one), limit=4, procs=1,
                                progress=False, do_import=False)
    render_fashion_mnist_photos("test", tmp_path / "2.csv", settings=_settings(sqlite_url, two), limit=4, procs=2,
                                progress=False, do_import=False)
    names = sorted(p.relative_to(one) for p in one.rglob("*.jpg"))
    assert len(names) == 4
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    train = render_fashion_mnist_photos("train", tmp_path / "3.csv", settings=_settings(sqlite_url, one), limit=1,
                                        procs=1, progress=False, do_import=False)
    assert train.written == 1 and (one / "fmnist-photo/train/00000.jpg").read_bytes() != (
        one / "fmnist-photo/test/00000.jpg").read_bytes()  # another split, another stream


def test_cli_render_photo(sqlite_url, tmp_path, monkeypatch, capsys):
    from worker.cli import main

    store = tmp_path / "store"
    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STYLETAG_STORE_URL", store.as_uri())
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path / "home"))
    main(["import", "fashion-mnist", "--render", "photo", "--limit", "2", "--procs", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 2 and report["imported"]["inserted"] == 2
    assert report["csv"] == str(tmp_path / "home" / "fashion-mnist-photo-test.csv")
