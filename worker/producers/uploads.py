"""The upload service's entry point: put new products on the ``uploads`` queue.

Each product is one small message; the worker micro-batches them (celery-batches), so a burst
becomes full batches and a lone upload is tagged within the flush interval plus inference.
"""

from __future__ import annotations

from collections.abc import Sequence

from catalog.db import session_scope
from catalog.products import ids_for_skus
from catalog.settings import Settings
from worker.app import UPLOADS_QUEUE
from worker.producers.send import TAG_UPLOADS, Sender


def product_ids_for_skus(settings: Settings, skus: Sequence[str]) -> list[int]:
    """Resolve SKUs to ids; any unknown SKU is an error before anything is enqueued."""
    with session_scope(settings.database_url) as session:
        return ids_for_skus(session, skus)


def enqueue_uploads(skus: Sequence[str], settings: Settings | None = None) -> list[int]:
    """Enqueue products by SKU for tagging on the uploads queue; returns their ids."""
    settings = settings or Settings.from_env()
    ids = product_ids_for_skus(settings, skus)
    enqueue_upload_ids(ids, settings)
    return ids


def enqueue_upload_ids(ids: Sequence[int], settings: Settings | None = None) -> None:
    with Sender(settings or Settings.from_env()) as send:
        for pid in ids:
            send(TAG_UPLOADS, (int(pid),), queue=UPLOADS_QUEUE)
