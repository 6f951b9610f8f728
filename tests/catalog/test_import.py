"""Fashion-MNIST import: counts per class, ground truth for both levels, idempotence, missing data."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from catalog.db import session_scope
from catalog.errors import DatasetMissing
from catalog.importers import import_fashion_mnist
from catalog.schema import Product, StyleLabel, StyleTruth
from catalog.storage import open_store
from model.fmnist import DEFAULT_SOURCE

pytestmark = pytest.mark.skipif(
    not any((DEFAULT_SOURCE / f"t10k-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz")),
    reason=f"Fashion-MNIST not in {DEFAULT_SOURCE} (apt-get install dataset-fashion-mnist)",
)


def _truth_counts(url: str, level: str) -> dict[str, int]:
    with session_scope(url) as s:
        rows = s.execute(
            select(StyleLabel.name, func.count())
            .join(StyleTruth, StyleTruth.label_id == StyleLabel.id)
            .where(StyleLabel.level == level)
            .group_by(StyleLabel.name)
        ).all()
    return dict(rows)


def test_full_test_split_counts_per_class(fmnist_test_split):
    cat = fmnist_test_split
    assert cat.report.inserted == 10_000 and cat.report.truth_inserted == 20_000
    assert cat.seconds < 60, f"10,000 products took {cat.seconds:.1f}s"
    fine = _truth_counts(cat.url, "fine")
    assert len(fine) == 10 and set(fine.values()) == {1000}
    coarse = _truth_counts(cat.url, "coarse")
    assert coarse == {"tops": 3000, "bottoms": 1000, "dresses": 1000, "outerwear": 1000, "bags": 1000, "shoes": 3000}
    with session_scope(cat.url) as s:
        p = s.execute(select(Product).where(Product.sku == "fmnist-test-00042")).scalar_one()
        assert p.title.startswith("Fashion-MNIST ") and p.title.endswith(" #42")
        assert p.image_uri == cat.store_url + "/fmnist/test/00042.png"
        assert open_store(cat.store_url).head(p.image_uri).version == p.image_version


def test_second_import_changes_nothing(fmnist_test_split):
    cat = fmnist_test_split
    image = Path(open_store(cat.store_url).uri_for("fmnist/test/00007.png").removeprefix("file://"))
    mtime = image.stat().st_mtime_ns
    with session_scope(cat.url) as s:
        before = s.execute(select(func.max(Product.updated_at), func.count()).select_from(Product)).one()
    again = import_fashion_mnist(cat.url, cat.store_url, "test", progress=False)
    assert (again.inserted, again.updated, again.truth_inserted, again.images_written) == (0, 0, 0, 0)
    assert again.unchanged == again.images_kept == 10_000
    assert image.stat().st_mtime_ns == mtime
    with session_scope(cat.url) as s:
        after = s.execute(select(func.max(Product.updated_at), func.count()).select_from(Product)).one()
    assert tuple(after) == tuple(before)


def test_import_on_postgres_with_limit_size_and_jpeg(pg_clean, tmp_path):
    store_url = (tmp_path / "images").as_uri()
    report = import_fashion_mnist(pg_clean, store_url, "train", limit=50, size=64, fmt="jpeg", progress=False)
    assert (report.inserted, report.images_written, report.truth_inserted) == (50, 50, 100)
    from PIL import Image

    with Image.open(tmp_path / "images" / "fmnist" / "train" / "00049.jpg") as img:
        assert img.size == (64, 64) and img.format == "JPEG"
    again = import_fashion_mnist(pg_clean, store_url, "train", limit=60, size=64, fmt="jpeg", progress=False)
    assert (again.inserted, again.unchanged, again.images_written, again.truth_inserted) == (10, 50, 10, 20)
    # Re-importing at another size rewrites the images and records their new versions.
    resized = import_fashion_mnist(pg_clean, store_url, "train", limit=60, size=32, fmt="jpeg", progress=False)
    assert (resized.inserted, resized.updated, resized.images_written) == (0, 60, 60)


def test_import_to_s3(sqlite_url, s3_server):
    bucket = s3_server.make_bucket()
    report = import_fashion_mnist(sqlite_url, f"s3://{bucket}/catalog", "test", limit=20, progress=False)
    assert report.images_written == 20
    with session_scope(sqlite_url) as s:
        uri, version = s.execute(select(Product.image_uri, Product.image_version).where(Product.sku == "fmnist-test-00003")).one()
    assert uri == f"s3://{bucket}/catalog/fmnist/test/00003.png"
    assert open_store(f"s3://{bucket}/catalog").head(uri).version == version
    assert import_fashion_mnist(sqlite_url, f"s3://{bucket}/catalog", "test", limit=20, progress=False).images_written == 0


def test_missing_dataset_names_the_debian_package(sqlite_url, tmp_path):
    with pytest.raises(DatasetMissing, match="dataset-fashion-mnist"):
        import_fashion_mnist(sqlite_url, tmp_path.as_uri(), "test", source=str(tmp_path / "nowhere"), progress=False)
