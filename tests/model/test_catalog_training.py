"""Training on a shop's own catalog, with one preprocessing for training and serving.

* The split is a function of the SKU alone (``worker.training.SplitRule``): the same membership on every
  call, whatever order the products were inserted in and whatever products are added later; the ratios
  asked for on 2,000 SKUs; ``--test-match`` is exactly the test split. The rule is recorded in the
  trained checkpoint (``meta["data"]["split"]``) and ``eval`` applies it again.
* One generated colour product photo (JPEG, ~600x800, light backdrop) decoded by training
  (``worker.training.decode_images``) and by the worker (``worker.pipeline.Pipeline.prepare``) gives the
  same uint8 bytes, and the same float input tensor (``model.preprocess.to_tensor`` /
  ``Predictor.input_tensor``).
* The whole chain through the CLI on a custom three-label taxonomy (coarse tops / shoes, fine tshirt /
  sneaker / boot, drawn shapes in four colours on light backdrops): taxonomy apply, import catalog,
  train --from-catalog, eval --from-catalog, model register + activate, retag --inline, find.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import truncate_all
from tests.support.cli import run_styletag
from tests.support.photo_model import photo_checkpoint

TAXONOMY = {
    "name": "tiny-shop",
    "levels": {
        "coarse": {"multi_label": False, "labels": ["tops", "shoes"]},
        "fine": {"multi_label": False, "labels": [
            {"name": "tshirt", "parents": ["tops"]},
            {"name": "sneaker", "parents": ["shoes"]},
            {"name": "boot", "parents": ["shoes"]},
        ]},
        "colour": {"labels": ["red", "blue", "green", "black"]},
    },
}
FINE = ("tshirt", "sneaker", "boot")
PARENT = {"tshirt": "tops", "sneaker": "shoes", "boot": "shoes"}
COLOURS = ("red", "blue", "green", "black")


# --------------------------------------------------------------------------- a tiny shop's catalog


def _item28(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 28 px silhouette (light on black, as model.render takes it) of ``kind``, a little different each time:
    a T (tshirt), a low wide block with an ankle bump (sneaker), an L (boot)."""
    a = np.zeros((28, 28), np.uint8)

    def j(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi + 1))

    v = j(170, 230)
    if kind == "tshirt":
        t = j(3, 6)
        a[t:t + j(5, 7), j(1, 3):28 - j(1, 3)] = v
        a[t:26 - j(0, 2), j(7, 9):28 - j(7, 9)] = v
    elif kind == "sneaker":
        top = j(13, 16)
        a[top:24, j(1, 3):28 - j(1, 3)] = v
        a[top - j(3, 5):top, j(2, 5):j(13, 16)] = v
    elif kind == "boot":
        left = j(5, 8)
        a[j(1, 4):25, left:left + j(7, 9)] = v
        a[18:25, left:28 - j(1, 3)] = v
    else:
        raise ValueError(kind)
    return a


def tiny_photo(kind: str, colour: str, seed: int) -> tuple[bytes, tuple[str, ...]]:
    """JPEG bytes of a plain ``colour`` ``kind`` on a light studio backdrop (model.render, 600-800 px) and the
    colours the renderer says it painted."""
    from model.render import render_photo

    rng = np.random.default_rng([2027, seed])
    photo = render_photo(_item28(kind, rng), rng, size=(600, 800), textures=("plain",), texture_weights=(1.0,),
                         colours=(colour,))
    buf = io.BytesIO()
    photo.image.save(buf, "JPEG", quality=90)
    return buf.getvalue(), tuple(photo.colours)


def write_catalog(store: Path, n: int, csv_path: Path) -> list[dict]:
    """``n`` photos under ``store`` and the CSV ``styletag import catalog`` takes; the rows written."""
    folder = store / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind, colour = FINE[i % 3], COLOURS[(i // 3) % 4]
        data, painted = tiny_photo(kind, colour, i)
        assert painted == (colour,)
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(data)
        rows.append({"sku": f"tiny-{i:04d}", "image_uri": path.as_uri(), "label:coarse": PARENT[kind],
                     "label:fine": kind, "label:colour": colour})
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.fixture
def shop_env(monkeypatch, tmp_path):
    """Environment of a shop: a file store, its allowed prefix and a STYLETAG_HOME of this test; the worker
    context (a process-wide singleton) is fresh before and after."""
    from worker.context import reset_context

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STYLETAG_STORE_URL", store.as_uri())
    monkeypatch.setenv("STYLETAG_ALLOWED_IMAGE_PREFIXES", store.as_uri() + "/")
    monkeypatch.setenv("STYLETAG_DEVICE", "cpu")
    monkeypatch.delenv("STYLETAG_MODEL", raising=False)
    reset_context()
    yield SimpleNamespace(store=store, home=tmp_path / "home", tmp=tmp_path)
    reset_context()


def _settings():
    from catalog.settings import Settings

    return Settings.from_env()


# --------------------------------------------------------------------------- 1. the split


def test_split_rule_is_the_sku_hash_with_the_ratios_asked():
    from worker.training import SplitRule, TrainingDataError, sku_bucket

    skus = [f"SHOP-{i:06d}-{(i * 7919) % 1000:03d}" for i in range(2000)]
    # the documented rule, computed here: stable across processes and machines (no salted hash())
    assert [sku_bucket(s) for s in skus[:50]] == [
        int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") % 100 for s in skus[:50]]
    for text, want in (("80/10/10", (0.8, 0.1, 0.1)), ("60/25/15", (0.6, 0.25, 0.15))):
        rule = SplitRule.parse(text)
        first = [rule.split_of(s) for s in skus]
        assert [SplitRule.parse(text).split_of(s) for s in skus] == first  # a new rule object, same answer
        assert [rule.split_of(s) for s in reversed(skus)] == first[::-1]  # no state, no order
        shares = [first.count(k) / len(skus) for k in ("train", "val", "test")]
        assert shares == pytest.approx(want, abs=0.03), (text, shares)
        assert SplitRule.from_dict(rule.to_dict()) == rule  # what the checkpoint records reads back the same

    holdout = [s for s in skus if s.endswith("7")]  # 200 SKUs end in 7
    rule = SplitRule.parse("80/10/10", test_match="*7")
    splits = {s: rule.split_of(s) for s in skus}
    assert {s for s, k in splits.items() if k == "test"} == set(holdout)
    rest = [k for s, k in splits.items() if s not in set(holdout)]
    assert rest.count("val") / len(rest) == pytest.approx(10 / 90, abs=0.03)  # train/val keep their ratio

    for bad in ("80/20", "80/10/20", "a/b/c", "0/50/50"):
        with pytest.raises(TrainingDataError) as info:
            SplitRule.parse(bad)
        assert "\n" not in str(info.value)


def _import(settings, path: Path) -> None:
    from catalog.importers.catalog_file import import_catalog_file

    report = import_catalog_file(path, settings=settings, taxonomy=TAXONOMY["name"], check_images=False)
    assert not report.rejected, report.rejected[:3]


def _csv(path: Path, store: Path, rows: list[tuple[str, str]]) -> Path:
    """Labelled products whose images are never read (the split needs none)."""
    lines = ["sku,image_uri,label:coarse,label:fine"]
    lines += [f"{sku},{(store / 'absent' / sku).as_uri()}.jpg,{PARENT[fine]},{fine}" for sku, fine in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _product_ids(url: str) -> dict[str, int]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import Product

    with session_scope(url) as s:
        return dict(s.execute(select(Product.sku, Product.id)).all())


def test_load_catalog_set_split_depends_on_the_sku_only(sqlite_url, shop_env, monkeypatch):
    """The catalog's labelled products in train / val / test: the same on two calls, after inserting them in
    the opposite order, and after 300 more products arrived; targets follow the truth labels."""
    from catalog.db import session_scope
    from catalog.labels import apply_taxonomy
    from worker.training import SplitRule, load_catalog_set, model_taxonomy

    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    settings = _settings()
    rows = [(f"ord-{(i * 37) % 1000:04d}-{i}", FINE[i % 3]) for i in range(400)]
    more = [(f"new-{i:04d}", FINE[(i + 1) % 3]) for i in range(300)]

    def apply() -> None:
        with session_scope(sqlite_url) as s:
            apply_taxonomy(s, TAXONOMY)

    apply()
    _import(settings, _csv(shop_env.tmp / "a.csv", shop_env.store, rows))
    tax = model_taxonomy(settings, TAXONOMY["name"])
    assert tax.fine.labels == FINE and tax.coarse.labels == ("tops", "shoes")
    rule = SplitRule.parse("70/15/15")
    one = load_catalog_set(settings, tax, rule)
    two = load_catalog_set(settings, tax, rule)
    first = dict(zip(one.skus, one.split.tolist(), strict=True))
    assert len(first) == 400 and first == dict(zip(two.skus, two.split.tolist(), strict=True))
    counts = one.counts()
    assert sum(counts.values()) == 400 and all(counts[k] > 20 for k in ("val", "test")), counts
    assert {k: v / 400 for k, v in counts.items()} == pytest.approx({"train": 0.7, "val": 0.15, "test": 0.15},
                                                                    abs=0.06)
    fine_of = dict(rows)
    assert [tax.fine.labels[f] for f in one.fine] == [fine_of[s] for s in one.skus]
    assert [tax.coarse.labels[c] for c in one.coarse] == [PARENT[fine_of[s]] for s in one.skus]
    ids_before = _product_ids(sqlite_url)

    # the same products inserted the other way round: other ids, other row order, the same split
    truncate_all(sqlite_url)
    apply()
    _import(settings, _csv(shop_env.tmp / "b.csv", shop_env.store, rows[::-1]))
    ids_after = _product_ids(sqlite_url)
    a, b = rows[0][0], rows[-1][0]
    assert (ids_before[a] < ids_before[b]) and (ids_after[a] > ids_after[b])  # the order really changed
    again = load_catalog_set(settings, tax, rule)
    assert dict(zip(again.skus, again.split.tolist(), strict=True)) == first

    # new products do not move the old ones
    _import(settings, _csv(shop_env.tmp / "c.csv", shop_env.store, more))
    grown = dict(zip(*(lambda d: (d.skus, d.split.tolist()))(load_catalog_set(settings, tax, rule)), strict=True))
    assert len(grown) == 700 and {s: grown[s] for s in first} == first
    # and --test-match puts exactly the matching SKUs, old or new, in test
    matched = load_catalog_set(settings, tax, SplitRule.parse("70/15/15", test_match="new-*"))
    assert set(np.asarray(matched.skus)[matched.index("test")]) == {s for s, _ in more}


# --------------------------------------------------------------------------- 2. one preprocessing


def test_training_and_the_worker_decode_the_same_bytes_and_tensors(sqlite_url, shop_env, monkeypatch):
    from catalog.db import session_scope
    from catalog.labels import apply_taxonomy
    from catalog.storage import ImageReader
    from model.checkpoint import load_checkpoint
    from model.predictor import Predictor
    from model.preprocess import PreprocessSpec, to_tensor
    from worker.pipeline import Pipeline
    from worker.training import decode_images

    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    rows = write_catalog(shop_env.store, 1, shop_env.tmp / "one.csv")
    path = shop_env.store / "tiny" / "0000.jpg"
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "JPEG" and 600 <= min(img.size) <= max(img.size) <= 800
        assert min(img.getpixel((2, 2))) > 150  # a light backdrop
    with session_scope(sqlite_url) as s:
        apply_taxonomy(s, TAXONOMY)
    settings = _settings()
    from catalog.importers.catalog_file import import_catalog_file

    report = import_catalog_file(shop_env.tmp / "one.csv", settings=settings, taxonomy="tiny-shop")
    assert report.inserted == 1 and not report.rejected
    pid = _product_ids(sqlite_url)["tiny-0000"]

    ckpt = shop_env.tmp / "photo.safetensors"
    photo_checkpoint(ckpt)  # a photo spec: backdrop crop, lab-delta, 28 px
    _, meta = load_checkpoint(ckpt)
    spec = PreprocessSpec.from_checkpoint_meta(meta)
    assert not spec.is_legacy and spec.foreground_crop

    # serving: the worker's pipeline reads the row, fetches and decodes as a batch would
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    ctx = SimpleNamespace(settings=settings, predictor=predictor, labels=None,
                          reader=ImageReader.from_settings(settings), model_threads=1)
    pipeline = Pipeline(ctx)
    assert pipeline.spec == spec
    with ThreadPoolExecutor(2) as pool:
        prepared = pipeline.prepare([pid], pool)
    assert not prepared.failures and [it.sku for it in prepared.items] == ["tiny-0000"]
    served = prepared.arrays[0]
    version = prepared.items[0].image_version

    # training: the catalog's URI and version through the training decoder (and its cache)
    trained, ok, reasons, analysis = decode_images(settings, [rows[0]["image_uri"]], [version], spec, procs=1,
                                                   progress=False)
    assert ok.tolist() == [True] and not reasons
    assert trained.dtype == served.dtype == np.uint8
    assert trained.shape == (1, *served.shape) and served.shape == (spec.input_size, spec.input_size, spec.channels)
    assert trained[0].tobytes() == served.tobytes()
    # the garment is in the picture (not an empty frame that would match anything): channel 0 is the
    # distance from the backdrop, high on the garment, 0 on the padding
    assert served[..., 0].max() > 150 and (served[..., 0] < 20).mean() > 0.05
    # colours: the worker tags what training's analysis saw, and that is the colour painted
    assert [n for n, _ in prepared.colours[0]][:1] == analysis.colours[0][:1] == [rows[0]["label:colour"]]

    # the cache hands training the same bytes without reading the file again
    path.unlink()
    cached, ok2, _, _ = decode_images(settings, [rows[0]["image_uri"]], [version], spec, procs=1, progress=False)
    assert ok2.tolist() == [True] and cached[0].tobytes() == served.tobytes()

    # the float input: training's to_tensor with the checkpoint's spec == the predictor's input_tensor
    x_train = to_tensor(trained, spec, channels_last=True)
    x_serve = predictor.input_tensor(served[None])
    assert x_train.dtype == x_serve.dtype == torch.float32 and x_train.shape == (1, 3, 28, 28)
    assert torch.equal(x_train, x_serve)
    assert not torch.equal(x_serve, to_tensor(trained, PreprocessSpec.from_dict({**spec.to_dict(),
                                                                                 "mean": [0.5, 0.5, 0.5]})))


# --------------------------------------------------------------------------- 3. the chain, through the CLI


def test_wrong_training_flags_are_one_line_errors(sqlite_url, shop_env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    out = str(tmp_path / "m.safetensors")
    cases = [
        (("train", "--from-catalog", "--out", out), "--from-catalog needs --taxonomy"),
        (("train", "--test-match", "x*", "--out", out), "--test-match needs --from-catalog"),
        (("train", "--from-catalog", "--taxonomy", "tiny-shop", "--split", "80/20", "--out", out),
         "--split '80/20': write three percentages"),
        (("train", "--from-catalog", "--taxonomy", "tiny-shop", "--out", str(tmp_path / "m.pt")),
         "--out must end in .safetensors"),
        (("train", "--from-catalog", "--taxonomy", "no-such", "--out", out), "no-such"),
    ]
    for args, needle in cases:
        proc = run_styletag(capsys, *args)
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:"), (args, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "m.safetensors").exists()


N_PRODUCTS = 240
TEST_GLOB = "tiny-*[05]"  # SKUs ending in 0 or 5: a fifth


def test_custom_taxonomy_from_catalog_to_storefront(pg_clean, shop_env, monkeypatch, capsys):
    import fnmatch

    from model.checkpoint import load_checkpoint
    from worker.training import SplitRule, model_taxonomy

    monkeypatch.setenv("STYLETAG_DATABASE_URL", pg_clean)

    def styletag(*args: str) -> tuple[str, str]:
        proc = run_styletag(capsys, *args)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc.stdout, proc.stderr

    tmp = shop_env.tmp
    (tmp / "tax.json").write_text(json.dumps(TAXONOMY))
    styletag("taxonomy", "apply", str(tmp / "tax.json"))
    rows = write_catalog(shop_env.store, N_PRODUCTS, tmp / "catalog.csv")
    report = json.loads(styletag("import", "catalog", str(tmp / "catalog.csv"), "--taxonomy", "tiny-shop",
                                 "--json")[0])
    assert (report["inserted"], report["rejected"]) == (N_PRODUCTS, 0)
    truth = {r["sku"]: r for r in rows}

    model = tmp / "m.safetensors"
    out, _ = styletag("train", "--from-catalog", "--taxonomy", "tiny-shop", "--split", "70/20/10",
                      "--test-match", TEST_GLOB, "--backbone", "resnet-tiny", "--epochs", "2",
                      "--batch-size", "32", "--outliers", "100", "--val-outliers", "50", "--procs", "1",
                      "--threads", "2", "--no-progress", "--out", str(model))
    test_skus = {s for s in truth if fnmatch.fnmatchcase(s, TEST_GLOB)}
    assert len(test_skus) == N_PRODUCTS // 5
    assert f"test {len(test_skus)}, never read here" in out
    # a catalog this small is told so, in one line each (validation ~38 products, batches of 32: 5 steps)
    assert "validation products: the temperature, review threshold and early stopping" in out
    assert "optimizer step(s) per epoch; --batch-size 8 learns more per epoch" in out
    _, meta = load_checkpoint(model)
    rule = SplitRule.parse("70/20/10", test_match=TEST_GLOB)
    assert meta["data"]["split"] == rule.to_dict()  # the rule is recorded...
    assert meta["data"]["counts"]["test"] == len(test_skus)
    assert meta["data"]["train_items"] + meta["data"]["val_items"] == N_PRODUCTS - len(test_skus)
    assert meta["taxonomy"]["name"] == "tiny-shop" and meta["backbone"] == "resnet-tiny"
    assert meta["preprocess"]["representation"] == "lab-delta"

    ev = json.loads(styletag("eval", "--from-catalog", "--checkpoint", str(model), "--outliers", "50",
                             "--procs", "1", "--no-progress", "--json")[0])
    # ...and eval applies it again: n is exactly the test split, nothing of it was trained on
    assert ev["n"] == len(test_skus) and ev["split"] == "test" and ev["split_rule"] == rule.to_dict()
    assert ev["consistency"] == 1.0
    # measured 0.96-0.98 on both levels (2 and 3 epochs); chance is 1/3 (fine) and 1/2 (coarse)
    assert ev["fine_top1"] >= 0.75, ev["fine_top1"]
    assert ev["coarse_top1"] >= 0.75, ev["coarse_top1"]
    cal = ev["calibration"]
    assert 0 <= cal["fine_ece_calibrated"] <= 1 and 0 <= cal["fine_ece_raw"] <= 1 and cal["reliability_fine"]
    assert cal["temperature"] == meta["temperature"]  # fitted on validation, served from the checkpoint
    assert cal["fine_ece_calibrated"] < cal["fine_ece_raw"]  # measured 0.62 -> 0.21
    rv = ev["review"]
    assert 0 < rv["coverage"] <= 1 and rv["review_threshold"] == meta["review_threshold"]
    assert 0 <= rv["garments_flagged"] <= 1 and rv["garments"] == ev["n"]
    assert {"non_garments_train_families", "non_garments_held_out_families"} <= set(rv)
    assert ev["colour"]["n"] == len(test_skus) and ev["colour"]["primary_accuracy"] >= 0.9

    # the registry: a random bootstrap model of the same taxonomy is what STYLETAG_MODEL names; the trained
    # one is registered (shadow) and activated, and the retag then writes its tags
    settings = _settings()
    boot = tmp / "bootstrap.safetensors"
    photo_checkpoint(boot, taxonomy=model_taxonomy(settings, "tiny-shop"), seed=5)
    monkeypatch.setenv("STYLETAG_MODEL", str(boot))
    reg = json.loads(styletag("model", "register", str(model), "--json")[0])
    assert reg["version"] == meta["model_version"] and reg["status"] == "shadow"
    styletag("model", "activate", meta["model_version"])
    listed = {m["version"]: m["status"] for m in json.loads(styletag("model", "list", "--json")[0])}
    assert listed[meta["model_version"]] == "active" and list(listed.values()).count("active") == 1

    out, err = styletag("retag", "--all", "--inline", "--json")
    run = json.loads(out.strip().splitlines()[-1])
    assert run["model_version"] == meta["model_version"]
    assert run["failed"] == 0 and run["done"] == N_PRODUCTS, run

    def find(style: str, level: str) -> list[dict]:
        got = json.loads(styletag("find", "--style", style, "--level", level, "--limit", "1000", "--json")[0])
        assert got["next_cursor"] is None
        return got["items"]

    # the storefront shows every product the run wrote, except those it held for review (unpublished)
    shown = N_PRODUCTS - run["review"]
    assert 0 <= run["review"] <= N_PRODUCTS // 5
    for level, names, key, precision in (("fine", FINE, "label:fine", 0.75), ("colour", COLOURS, "label:colour", 0.9)):
        skus: set[str] = set()
        for name in names:
            items = find(name, level)
            assert items and all(i["level"] == level and i["style"] == name for i in items)
            assert {i["model_version"] for i in items} == {meta["model_version"]}
            right = sum(truth[i["sku"]][key] == name for i in items)
            assert right / len(items) >= precision, (level, name, right, len(items))
            skus |= {i["sku"] for i in items}
        assert len(skus) == shown, (level, len(skus), shown)
