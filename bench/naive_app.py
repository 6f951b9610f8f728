"""The naive Celery design the issue compares against: one task per product, a single-image forward,
and one ORM insert plus commit per tag row. Same model, same images, same database and broker.

Started by ``bench.alternatives`` as ``celery --app bench.naive_app:app worker -Q naive``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from celery import Celery, signals

app = Celery("naive", broker=os.environ["STYLETAG_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True, task_acks_late=True,
                worker_prefetch_multiplier=1, task_default_queue="naive", worker_send_task_events=False)

_state: dict = {}


@signals.worker_process_init.connect
def _load(**_kw) -> None:
    _setup()


def _setup() -> dict:
    if _state:
        return _state
    import torch

    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.models import register_model
    from catalog.storage import ImageReader
    from model.predictor import Predictor

    torch.set_num_threads(int(os.environ.get("STYLETAG_TORCH_THREADS", "1")))
    url = os.environ["STYLETAG_DATABASE_URL"]
    predictor = Predictor.from_checkpoint(os.environ["STYLETAG_MODEL"], device="cpu", batch_size=1)
    with session_scope(url) as s:
        labels = sync_labels(s, predictor.taxonomy)
        register_model(s, predictor.model_version, predictor.trained_at, predictor.taxonomy.name, predictor.backbone)
    _state.update(url=url, predictor=predictor, labels=labels,
                  reader=ImageReader((os.environ["STYLETAG_STORE_URL"].rstrip("/") + "/",), 20 * 1024 * 1024))
    print("naive model loaded", flush=True)
    return _state


@app.task(name="naive.tag_one")
def tag_one(product_id: int) -> None:
    from sqlalchemy.orm import Session

    from catalog.db import engine_for
    from catalog.schema import Product, ProductStyle, TagState
    from model.preprocess import decode_image

    st = _setup()
    p, labels = st["predictor"], st["labels"]
    with Session(engine_for(st["url"])) as session:
        product = session.get(Product, product_id)
        arr = decode_image(st["reader"].get(product.image_uri), p.spec, 40_000_000)
        pred = p.predict(arr[None])[0]
        now = datetime.now(UTC)
        tags = [(labels.coarse_ids[i], s, i == pred.primary_coarse) for i, s in pred.coarse_tags]
        tags += [(labels.fine_ids[i], s, i == pred.primary_fine) for i, s in pred.fine_tags]
        for label_id, score, primary in tags:
            session.merge(ProductStyle(product_id=product_id, label_id=label_id, score=min(1.0, max(0.0, score)),
                                       is_primary=primary, model_version=p.model_version, tagged_at=now))
            session.commit()
        session.merge(TagState(product_id=product_id, model_version=p.model_version,
                               image_version=product.image_version, status="tagged", attempts=1, updated_at=now))
        session.commit()
