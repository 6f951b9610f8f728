"""The upload service's entry point: put new products on the ``uploads`` queue.

An upload may carry its product: ``{"sku": ..., "image_uri": ..., "title": ...}`` is upserted first
(``catalog.products.upsert_products``, the same path as ``styletag import catalog``: checked, image version
read), so a brand-new SKU is tagged without any prior import and a new photo of an existing SKU re-tags it.
A plain SKU string names an existing product. Every item is checked before anything is written or sent: one
bad item is an error and nothing happens.

One upload is one small message; the worker micro-batches them (celery-batches), so a burst becomes full
batches and a lone upload is tagged at once when the worker is idle. Several products enqueued in one call
travel in messages of up to ``min(MAX_IDS_PER_UPLOAD, STYLETAG_UPLOAD_BATCH)`` ids: publishing is ~0.3 ms of
CPU per message, which for a burst of 1,000 on the 2-core machine was a quarter of the burst's time
(docs/performance.md). Workers older than this accept one id per message only: upgrade workers first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from catalog.db import session_scope
from catalog.errors import StyletagError
from catalog.products import archived_skus, ids_for_skus, upsert_products
from catalog.settings import Settings
from worker.app import UPLOADS_QUEUE
from worker.messages import MAX_IDS_PER_UPLOAD
from worker.producers.send import TAG_UPLOADS, Sender


def product_ids_for_skus(settings: Settings, skus: Sequence[str]) -> list[int]:
    """Resolve SKUs to ids; any unknown or archived SKU is an error before anything is enqueued."""
    with session_scope(settings.database_url) as session:
        ids = ids_for_skus(session, skus)
        archived = archived_skus(session, skus)
    if archived:
        raise StyletagError(f"SKU {archived[0][:80]!r} is archived; nothing was enqueued (enqueue it with its "
                            "image URI, or import it again, to bring it back)")
    return ids


def enqueue_uploads(items: Sequence[str | Mapping], settings: Settings | None = None) -> list[int]:
    """Enqueue products for tagging on the uploads queue; returns their ids in the items' order.

    ``items``: SKUs of existing products and/or uploads ``{"sku", "image_uri"[, "title"]}``, which are
    created or updated first (their image must be readable). Nothing is written or sent unless every
    item is good (RowsRejected / NotFound name the first bad one)."""
    settings = settings or Settings.from_env()
    if isinstance(items, str | Mapping):
        items = [items]
    skus = list(dict.fromkeys(i for i in items if isinstance(i, str)))
    uploads = [i for i in items if not isinstance(i, str)]
    known = dict(zip(skus, product_ids_for_skus(settings, skus), strict=True)) if skus else {}
    if uploads:
        report = upsert_products(uploads, settings=settings, strict=True, require_images=True, want_ids=True)
        known.update(report.ids)
    ids = list(dict.fromkeys(known[i if isinstance(i, str) else str(i["sku"]).strip()] for i in items))
    enqueue_upload_ids(ids, settings)
    return ids


def enqueue_upload_ids(ids: Sequence[int], settings: Settings | None = None) -> int:
    """Send ``ids`` to the uploads queue; returns the number of messages (one id alone: the one-id form)."""
    settings = settings or Settings.from_env()
    ids = [int(i) for i in ids]
    per = max(1, min(MAX_IDS_PER_UPLOAD, settings.upload_batch))
    parts = [ids[k : k + per] for k in range(0, len(ids), per)]
    with Sender(settings) as send:
        for part in parts:
            # enqueued_at: the worker observes styletag_upload_latency_seconds (enqueue -> tags committed)
            send(TAG_UPLOADS, (part[0] if len(part) == 1 else part,), {"enqueued_at": time.time()},
                 queue=UPLOADS_QUEUE)
    return len(parts)
