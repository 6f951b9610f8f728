"""``styletag report RUN_ID --html``: a real run (Fashion-MNIST products in a moto S3 bucket plus a
few bad ones, tagged by the real pipeline), its self-contained HTML page, and that page rendered by
headless Chromium into a screenshot that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from catalog.db import session_scope
from catalog.schema import Product, TagState
from catalog.settings import Settings
from tests.conftest import truncate_all
from tests.ops.test_smoke import BIN, run_counts, service_env

N_GOOD = 160
XSS_SKU = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def tagged_run(pg_url, s3_server, tmp_path_factory):
    from catalog.importers import import_fashion_mnist
    from worker.context import reset_context
    from worker.producers.retag import run_inline, start_run

    truncate_all(pg_url)
    bucket = s3_server.make_bucket()
    store = f"s3://{bucket}/products"
    import_fashion_mnist(pg_url, store, "test", limit=N_GOOD, progress=False)
    s3_server.client().put_object(Bucket=bucket, Key="products/bad/corrupt.jpg", Body=b"<html>oops</html>")
    bad = {"bad-corrupt": f"{store}/bad/corrupt.jpg", "bad-missing": f"{store}/bad/missing.png",
           XSS_SKU: f"s3://{bucket}/elsewhere/x.png"}  # outside the allowed prefix: refused
    with session_scope(pg_url) as s:
        s.add_all([Product(sku=sku, title=sku, image_uri=uri, image_version="v1") for sku, uri in bad.items()])
    env = service_env(STYLETAG_DATABASE_URL=pg_url, STYLETAG_STORE_URL=store,
                      STYLETAG_ALLOWED_IMAGE_PREFIXES=store + "/", STYLETAG_HOME=str(tmp_path_factory.mktemp("rh")))
    settings = replace(Settings.from_env(), database_url=pg_url, store_url=store, allowed_image_prefixes=(store + "/",),
                       batch_size=32, fetch_threads=4)
    reset_context()
    try:
        run_id = start_run(settings, scope="all")
        report = run_inline(settings, run_id, progress=False)
    finally:
        reset_context()
    assert (report.tagged, report.failed) == (N_GOOD, len(bad))
    return {"settings": settings, "run_id": run_id, "env": env, "db": pg_url,
            "out": tmp_path_factory.mktemp("report")}


@pytest.fixture(scope="module")
def page(tagged_run):
    out = tagged_run["out"] / "report.html"
    proc = subprocess.run([str(BIN / "styletag"), "report", str(tagged_run["run_id"]), "--html", str(out), "--json"],
                          env=tagged_run["env"], capture_output=True, text=True, timeout=180, cwd=tagged_run["out"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, out.read_text(encoding="utf-8"), json.loads(proc.stdout)


def test_report_counts_and_failures_are_the_databases(tagged_run, page):
    _, _, data = page
    counts = run_counts(tagged_run["db"], tagged_run["run_id"])
    assert data["counts"]["tagged"] == counts[("tagged", None)] == N_GOOD
    assert data["counts"]["failed"] == 3 and data["counts"]["total"] == N_GOOD + 3
    assert data["run"]["status"] == "done"
    by_reason = {f["reason"]: [x["sku"] for x in f["examples"]] for f in data["failures"]}
    assert by_reason == {"not_an_image": ["bad-corrupt"], "missing": ["bad-missing"], "forbidden": [XSS_SKU]}
    assert sum(f["count"] for f in data["failures"]) == 3
    # Throughput buckets add up to every product written in the run.
    assert sum(t + f for _, t, f in data["series"]) == N_GOOD + 3
    # Distributions: every product has one primary coarse and one primary fine style.
    assert sum(r["count"] for r in data["coarse"]) == N_GOOD == sum(r["count"] for r in data["fine"])
    assert len(data["fine"]) == 10 and len(data["coarse"]) == 6
    with session_scope(tagged_run["db"]) as s:
        assert s.scalar(select(func.count()).select_from(TagState).where(TagState.run_id == tagged_run["run_id"])) \
            == N_GOOD + 3
    # The import's labels are human truth: agreement is measured on every tagged product.
    assert data["agreement"]["fine"][1] == N_GOOD and data["agreement"]["coarse"][1] == N_GOOD


def test_report_is_one_self_contained_page(page):
    path, text, data = page
    assert text.startswith("<!DOCTYPE html>")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", text, re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), [r[:60] for r in refs if
                                                                              not r.startswith("data:")]
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.I)
    assert "url(" not in text and "@import" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the catalog's strings are escaped
    n_examples = sum(len(v) for v in data["examples"].values())
    assert n_examples >= 10
    # Three charts (throughput, coarse, fine) and one thumbnail per example, fetched through the store.
    assert text.count('src="data:image/png;base64,') == 3 + n_examples
    assert "no image" not in text
    for f in data["fine"]:
        assert f">{f['name']} <span" in text.replace("&#x27;", "'")
    for reason in ("not_an_image", "missing", "forbidden"):
        assert f"<code>{reason}</code>" in text
    assert path.stat().st_size < 2_000_000


def test_thumbnails_go_through_the_allowed_prefixes(tagged_run):
    from catalog.storage import ImageReader
    from worker.ops.report import Example, thumbnails

    store = tagged_run["settings"].store_url
    with session_scope(tagged_run["db"]) as s:
        uri = s.scalar(select(Product.image_uri).where(Product.sku.like("fmnist-%")).limit(1))
    reader = ImageReader((store + "/",), 1 << 20)
    outside = uri.replace("/products/", "/elsewhere/")
    got = thumbnails([Example("a", "a", uri, 0.9, "tops", 0.9), Example("b", "b", outside, 0.9, "tops", 0.9)], reader)
    assert got[uri].startswith("data:image/png;base64,") and got[outside] is None


def test_report_of_an_unknown_run_is_one_line(tagged_run):
    proc = subprocess.run([str(BIN / "styletag"), "report", "987654", "--html", "x.html"], env=tagged_run["env"],
                          capture_output=True, text=True, timeout=120, cwd=tagged_run["out"])
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no tagging run 987654; 'styletag runs' lists them"
    assert not (tagged_run["out"] / "x.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium; "
                                             "make setup does it as root)")
def test_report_renders_in_headless_chromium(page, tmp_path):
    import numpy as np
    from PIL import Image

    path, _, _ = page
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         path.as_uri()], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 200, colours  # text, charts and thumbnails, not a blank or an error page
    assert img.std() > 20, img.std()
    light = (img > 235).all(axis=2).mean()
    assert 0.2 < light < 0.98, light  # a page with a light background and content on it
    # Content spreads down the page: each horizontal quarter of the screenshot holds something.
    for quarter in np.array_split(img, 4, axis=0):
        assert len(np.unique(quarter.reshape(-1, 3), axis=0)) > 20
