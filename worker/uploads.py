"""The upload service's entry point: put new products on the ``uploads`` queue.

Each product is one small message; the worker micro-batches them (celery-batches), so a burst
becomes full batches and a lone upload is tagged within the flush interval plus inference.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from catalog.db import session_scope
from catalog.errors import NotFound, ServiceUnavailable
from catalog.schema import Product
from catalog.settings import Settings, redact_url


def product_ids_for_skus(settings: Settings, skus: Sequence[str]) -> list[int]:
    """Resolve SKUs to ids; any unknown SKU is an error before anything is enqueued."""
    wanted = list(dict.fromkeys(skus))
    found: dict[str, int] = {}
    with session_scope(settings.database_url) as session:
        for i in range(0, len(wanted), 1000):
            chunk = wanted[i : i + 1000]
            found.update(session.execute(select(Product.sku, Product.id).where(Product.sku.in_(chunk))).all())
    missing = [s for s in wanted if s not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NotFound(f"unknown SKU {missing[0]!r}{more}; nothing was enqueued")
    return [found[s] for s in wanted]


def enqueue_uploads(skus: Sequence[str], settings: Settings | None = None) -> list[int]:
    """Enqueue products by SKU for tagging on the uploads queue; returns their ids."""
    settings = settings or Settings.from_env()
    ids = product_ids_for_skus(settings, skus)
    enqueue_upload_ids(ids, settings)
    return ids


def enqueue_upload_ids(ids: Sequence[int], settings: Settings | None = None) -> None:
    from kombu.exceptions import OperationalError

    from worker.app import UPLOADS_QUEUE, app, broker_connection
    from worker.tasks import tag_uploads

    settings = settings or Settings.from_env()
    try:
        with broker_connection(settings) as conn, app.producer_or_acquire(conn.Producer()) as producer:
            for pid in ids:
                tag_uploads.apply_async(args=(int(pid),), queue=UPLOADS_QUEUE, producer=producer,
                                        retry=True, retry_policy={"max_retries": 3})
    except OperationalError as exc:
        raise ServiceUnavailable(
            f"cannot reach the broker at {redact_url(settings.broker_url)}: {str(exc).splitlines()[0][:120]}"
        ) from None
