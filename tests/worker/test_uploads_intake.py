"""Uploads that carry their product, and photos replaced behind an unchanged URI, through a real Celery worker
subprocess, PostgreSQL, Redis and a file store: a brand-new SKU enqueued with its image URI is created and
tagged without any import; a new photo of an existing SKU re-tags it; ``retag --changed-only`` notices a
photo replaced at the same URI (and a product inserted by plain SQL) and tags exactly those.

The tests of this module share one worker and one catalog and run in file order.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, text

from catalog.db import session_scope
from catalog.schema import Product, ProductStyle, TagState
from catalog.storage import open_store
from tests.worker.conftest import N_PRODUCTS, run_cli, wait_until

pytestmark = pytest.mark.slow
WRITTEN = ("tagged", "review")  # a written product, shown or held for review


def _photo(index: int) -> bytes:
    from catalog.importers import encode_image
    from model.fmnist import load_split

    images, _ = load_split("test")
    return encode_image(images[index], 28)


def _state(url: str, sku: str):
    with session_scope(url) as s:
        return s.execute(select(TagState.status, TagState.image_version, Product.image_version, TagState.updated_at)
                         .join(Product, Product.id == TagState.product_id).where(Product.sku == sku)).first()


def test_upload_of_a_brand_new_sku_is_tagged(celery_worker, apply_env, catalog_500, store_dir):
    store = open_store(store_dir.as_uri())
    info = store.put("uploads/new-1.png", _photo(9000))
    uri = store.uri_for("uploads/new-1.png")
    out = run_cli(apply_env, "enqueue", "NEW-1", "--image-uri", uri, "--title", "A brand-new product")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "enqueued 1 products on the uploads queue"
    state = wait_until(lambda: _state(catalog_500, "NEW-1"), timeout=60)
    assert state.status in WRITTEN
    assert state[1] == state[2] == info.version  # what the worker read is what the catalog knows
    with session_scope(catalog_500) as s:
        p = s.execute(select(Product).where(Product.sku == "NEW-1")).scalar_one()
        assert (p.title, p.image_uri) == ("A brand-new product", uri)
        assert s.scalar(select(func.count()).select_from(ProductStyle).where(ProductStyle.product_id == p.id)) >= 2


def test_a_new_photo_of_an_existing_sku_retags_it(celery_worker, apply_env, catalog_500, store_dir):
    from catalog.products import RowsRejected
    from worker.producers.uploads import enqueue_uploads

    store = open_store(store_dir.as_uri())
    uri = store.uri_for("uploads/new-1.png")
    before = _state(catalog_500, "NEW-1")
    new = store.put("uploads/new-1.png", _photo(9001))  # same URI, new bytes
    assert new.version != before[1]
    ids = enqueue_uploads([{"sku": "NEW-1", "image_uri": uri}])
    state = wait_until(lambda: (st := _state(catalog_500, "NEW-1")) and st[1] == new.version and st, timeout=60)
    assert state[2] == new.version and state[3] > before[3]
    assert enqueue_uploads(["NEW-1"]) == ids  # a plain SKU string still works
    with pytest.raises(RowsRejected, match="forbidden_uri"):
        enqueue_uploads(["NEW-1", {"sku": "NEW-2", "image_uri": "file:///etc/passwd"}])
    with pytest.raises(RowsRejected, match="image_unreadable"):
        enqueue_uploads([{"sku": "NEW-3", "image_uri": store.uri_for("uploads/not-there.png")}])
    with session_scope(catalog_500) as s:
        assert s.scalar(select(func.count()).select_from(Product).where(Product.sku.in_(["NEW-2", "NEW-3"]))) == 0
    bad = run_cli(apply_env, "enqueue", "NEW-4", "--image-uri", "s3://elsewhere/x.png")
    assert bad.returncode == 1 and bad.stderr.startswith("error: 1 rows rejected, nothing was written")


def _retag(env) -> tuple[dict, str]:
    out = run_cli(env, "retag", "--changed-only", "--wait", "--timeout", "300", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_changed_only_retags_a_photo_replaced_behind_its_uri(celery_worker, apply_env, catalog_500, store_dir):
    store = open_store(store_dir.as_uri())
    store.put("uploads/sql-1.png", _photo(9002))
    with session_scope(catalog_500) as s:  # what a shop's own SQL does: no version, server-side timestamps
        s.execute(text("INSERT INTO products (sku, image_uri) VALUES ('SQL-1', :u)"),
                  {"u": store.uri_for("uploads/sql-1.png")})
    first, _ = _retag(apply_env)
    assert first["status"] == "done" and first["failed"] == 0 and first["total"] == N_PRODUCTS + 1
    with session_scope(catalog_500) as s:
        mismatched = s.scalar(select(func.count()).select_from(TagState).join(Product)
                              .where(TagState.image_version.is_distinct_from(Product.image_version)))
        victim = s.execute(select(Product.sku, Product.image_uri).order_by(Product.id).offset(7).limit(1)).one()
    assert mismatched == 0
    key = victim.image_uri.removeprefix(store.url + "/")
    new = store.put(key, _photo(9003))  # replaced behind an unchanged URI, as a CDN upload would
    second, err = _retag(apply_env)
    assert "1 changed" in err
    assert (second["total"], second["done"], second["failed"]) == (1, 1, 0)
    assert _state(catalog_500, victim.sku)[1:3] == (new.version, new.version)
    third, err = _retag(apply_env)
    assert third["total"] == 0 and "0 changed" in err
