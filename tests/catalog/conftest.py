"""Catalog fixtures: one full import of the Fashion-MNIST test split per session, shared read-only."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from model.fmnist import DEFAULT_SOURCE

HAVE_FMNIST = any((DEFAULT_SOURCE / f"t10k-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz"))


@dataclass
class ImportedCatalog:
    url: str
    store_url: str
    report: object
    seconds: float


@pytest.fixture(scope="session")
def fmnist_test_split(tmp_path_factory) -> ImportedCatalog:
    """The whole test split (10,000 products) imported into a SQLite catalog with a file store.
    Read-only for the tests that use it."""
    if not HAVE_FMNIST:
        pytest.skip(f"Fashion-MNIST not in {DEFAULT_SOURCE}")
    from catalog.importers import import_fashion_mnist
    from catalog.migrate import upgrade

    root = tmp_path_factory.mktemp("fmnist-full")
    url = f"sqlite:///{root / 'catalog.db'}"
    store_url = (root / "images").as_uri()
    upgrade(url)
    started = time.perf_counter()
    report = import_fashion_mnist(url, store_url, "test", progress=False)
    return ImportedCatalog(url=url, store_url=store_url, report=report, seconds=time.perf_counter() - started)


@dataclass
class Seeded:
    url: str
    ids: list[int]
    labels: object  # catalog.labels.LabelMap


@pytest.fixture
def seed():
    """seed(url, n) -> Seeded: n products (sku p00000...) and the fashion-mnist labels."""
    from datetime import UTC, datetime

    from sqlalchemy import insert, select

    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.schema import Product
    from model.taxonomy import load_taxonomy

    def make(url: str, n: int, start: int = 0) -> Seeded:
        now = datetime.now(UTC)
        with session_scope(url) as s:
            labels = sync_labels(s, load_taxonomy("fashion-mnist"))
            if n:
                s.execute(insert(Product.__table__), [
                    {"sku": f"p{i:05d}", "title": f"product {i}", "image_uri": f"file:///img/{i}.png",
                     "image_version": f"v{i}", "created_at": now, "updated_at": now}
                    for i in range(start, start + n)
                ])
            ids = list(s.scalars(select(Product.id).order_by(Product.id)))
        return Seeded(url=url, ids=ids, labels=labels)

    return make
