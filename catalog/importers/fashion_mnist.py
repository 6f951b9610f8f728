"""Fashion-MNIST as 28 px products with ground truth (``styletag import fashion-mnist``).

The import is idempotent and restartable: products are keyed by SKU, an image is written only when
the store does not already hold the same bytes, and ground truth rows are inserted with ON CONFLICT
DO NOTHING. Running it twice changes nothing; running it after a crash finishes the job.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select, update

from catalog.db import dialect_insert, session_scope
from catalog.errors import StyletagError
from catalog.labels import sync_labels
from catalog.schema import Product, StyleTruth
from catalog.storage import Store, open_store
from model.fmnist import CLASSES, load_split
from model.taxonomy import load_taxonomy

TAXONOMY = "fashion-mnist"
FORMATS = {"png": ("PNG", "png", "image/png"), "jpeg": ("JPEG", "jpg", "image/jpeg")}
BATCH = 1000


@dataclass
class ImportReport:
    split: str
    total: int = 0  # products in the requested range
    inserted: int = 0  # new products rows
    updated: int = 0  # existing products whose image changed (e.g. another --size)
    unchanged: int = 0
    images_written: int = 0
    images_kept: int = 0  # already in the store with the same bytes
    truth_inserted: int = 0
    seconds: float = 0.0
    per_class: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def encode_image(pixels: np.ndarray, size: int = 28, fmt: str = "png") -> bytes:
    """One 28x28 grey image as PNG/JPEG bytes, upscaled (bicubic) to ``size`` to look like a photo
    of the resolution the model will see. Deterministic, so re-imports produce identical bytes."""
    from PIL import Image

    pil_format = FORMATS[fmt][0]
    img = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L")
    if size != img.width:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if pil_format == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _store_image(store: Store, key: str, data: bytes, content_type: str) -> tuple[str, bool]:
    """Write unless the store already holds these exact bytes; (version, written)."""
    info, written = store.put_if_changed(key, data, content_type=content_type)
    return info.version, written


def import_fashion_mnist(
    database_url: str,
    store_url: str,
    split: str,
    limit: int | None = None,
    size: int = 28,
    fmt: str = "png",
    source: str | None = None,
    progress: bool = True,
    threads: int = 8,
) -> ImportReport:
    """Import the first ``limit`` images of a split as products with ground-truth labels."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise StyletagError(f"unknown image format {fmt!r}; use png or jpeg")
    if not 8 <= size <= 2048:
        raise StyletagError(f"--size must be between 8 and 2048 pixels, got {size}")
    if limit is not None and limit < 0:
        raise StyletagError("--limit must not be negative")
    try:
        images, labels = load_split(split, source)  # a missing dataset is a DatasetMissing naming the package
    except ValueError as exc:
        raise StyletagError(str(exc)) from None
    n = len(labels) if limit is None else min(limit, len(labels))
    store = open_store(store_url)
    taxonomy = load_taxonomy(TAXONOMY)
    _, ext, content_type = FORMATS[fmt]
    report = ImportReport(split=split, total=n)
    started = time.perf_counter()

    with session_scope(database_url) as session:
        labels_map = sync_labels(session, taxonomy)
    fine_ids, coarse_ids = labels_map.fine_ids, labels_map.coarse_ids
    class_index = [taxonomy.fine.labels.index(name) for name in CLASSES]  # dataset label -> taxonomy index

    bar = tqdm(total=n, unit="img", desc=f"fashion-mnist {split}", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="styletag-import") as pool:
        for lo in range(0, n, BATCH):
            idx = range(lo, min(lo + BATCH, n))
            skus = [f"fmnist-{split}-{i:05d}" for i in idx]
            keys = [f"fmnist/{split}/{i:05d}.{ext}" for i in idx]

            def put(i: int, key: str) -> tuple[str, bool]:
                return _store_image(store, key, encode_image(images[i], size, fmt), content_type)

            stored = list(pool.map(put, idx, keys))
            report.images_written += sum(1 for _, w in stored if w)
            report.images_kept += sum(1 for _, w in stored if not w)
            with session_scope(database_url) as session:
                _upsert_batch(session, report, store, idx, skus, keys, [v for v, _ in stored], labels,
                              class_index, fine_ids, coarse_ids, taxonomy.parents)
            bar.update(len(idx))
    bar.close()
    for i in range(n):
        name = CLASSES[int(labels[i])]
        report.per_class[name] = report.per_class.get(name, 0) + 1
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _upsert_batch(session, report, store, idx, skus, keys, versions, labels, class_index, fine_ids, coarse_ids,
                  parents) -> None:
    """Insert new products, refresh changed ones, add missing ground truth: one transaction."""
    now = datetime.now(UTC)
    existing = {
        r.sku: r
        for r in session.execute(
            select(Product.id, Product.sku, Product.image_uri, Product.image_version).where(Product.sku.in_(skus))
        )
    }
    new_rows, changed = [], []
    for i, sku, key, version in zip(idx, skus, keys, versions, strict=True):
        name = CLASSES[int(labels[i])]
        uri = store.uri_for(key)
        row = existing.get(sku)
        if row is None:
            new_rows.append({"sku": sku, "title": f"Fashion-MNIST {name} #{i}", "image_uri": uri,
                             "image_version": version, "created_at": now, "updated_at": now})
        elif row.image_uri != uri or row.image_version != version:
            changed.append({"pid": row.id, "uri": uri, "version": version})
        else:
            report.unchanged += 1
    products = Product.__table__
    if new_rows:
        # ON CONFLICT: a concurrent import of the same split may have inserted some meanwhile.
        result = session.execute(
            dialect_insert(session, products).on_conflict_do_nothing(index_elements=["sku"]).returning(products.c.id),
            new_rows,
        )
        report.inserted += len(result.all())
    if changed:
        for ch in changed:
            session.execute(
                update(products).where(products.c.id == ch["pid"]).values(
                    image_uri=ch["uri"], image_version=ch["version"], updated_at=now
                )
            )
        report.updated += len(changed)
    ids = dict(session.execute(select(Product.sku, Product.id).where(Product.sku.in_(skus))).all())
    have_truth = set(
        session.scalars(select(StyleTruth.product_id).where(StyleTruth.product_id.in_(list(ids.values()))))
    )
    truth = []
    for i, sku in zip(idx, skus, strict=True):
        pid = ids.get(sku)
        if pid is None or pid in have_truth:
            continue
        f = class_index[int(labels[i])]
        truth.append({"product_id": pid, "label_id": fine_ids[f], "source": TAXONOMY, "created_at": now})
        truth.extend(
            {"product_id": pid, "label_id": coarse_ids[c], "source": TAXONOMY, "created_at": now} for c in parents[f]
        )
    if truth:
        session.execute(dialect_insert(session, StyleTruth).on_conflict_do_nothing(), truth)
        report.truth_inserted += len(truth)
