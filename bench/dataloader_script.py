"""The best single-process script a user would write instead of styletag: a torch DataLoader whose
worker processes read the same file store, a batched forward, one bulk insert at the end.

    python -m bench.dataloader_script DATABASE_URL MODEL [--limit N] [--workers W] [--batch B] [--threads T]

Prints one JSON line: products, seconds (first row read to commit; the model load is excluded, as
it is for a running styletag worker), images_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model.preprocess import decode_image


class Images(Dataset):
    def __init__(self, rows, spec):
        self.rows, self.spec = rows, spec  # model.preprocess.PreprocessSpec of the checkpoint

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        _pid, uri = self.rows[i]
        with open(unquote(urlsplit(uri).path), "rb") as fh:
            data = fh.read()
        return decode_image(data, self.spec, 40_000_000), i


def collate(items):
    arrays, idx = zip(*items, strict=True)
    return np.stack(arrays), list(idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("database_url")
    ap.add_argument("model")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sqlalchemy import create_engine, delete, select, text
    from sqlalchemy.dialects.postgresql import insert

    from catalog.labels import sync_labels
    from catalog.models import register_model
    from catalog.schema import Product, ProductStyle, TagState
    from model.predictor import Predictor

    predictor = Predictor.from_checkpoint(args.model, device="cpu", batch_size=args.batch)
    engine = create_engine(args.database_url)
    with engine.begin() as conn:
        from sqlalchemy.orm import Session

        with Session(bind=conn) as s:
            labels = sync_labels(s, predictor.taxonomy)
            register_model(s, predictor.model_version, predictor.trained_at, predictor.taxonomy.name,
                           predictor.backbone)
            s.flush()
    t0 = time.perf_counter()
    with engine.connect() as conn:
        q = select(Product.id, Product.image_uri).order_by(Product.id)
        rows = conn.execute(q.limit(args.limit) if args.limit else q).all()
    loader = DataLoader(Images(rows, predictor.spec), batch_size=args.batch,
                        num_workers=args.workers, collate_fn=collate)
    styles, states = [], []
    now = datetime.now(UTC)
    cids, fids, mv = labels.coarse_ids, labels.fine_ids, predictor.model_version
    for batch, idx in loader:
        a = predictor.predict_arrays(batch)
        for j, i in enumerate(idx):
            pid = rows[i][0]
            for level_ids, mask, scores, primary in ((cids, a["coarse_tags"], a["coarse_scores"], a["primary_coarse"]),
                                                     (fids, a["fine_tags"], a["fine_scores"], a["primary_fine"])):
                for k in np.flatnonzero(mask[j]):
                    styles.append({"product_id": pid, "label_id": level_ids[k], "score": float(min(1.0, scores[j, k])),
                                   "is_primary": bool(k == primary[j]), "model_version": mv, "tagged_at": now})
            states.append({"product_id": pid, "model_version": mv, "image_version": None, "status": "tagged",
                           "attempts": 1, "updated_at": now})
    with engine.begin() as conn:  # one bulk insert (one transaction)
        ids = [r[0] for r in rows]
        conn.execute(delete(ProductStyle.__table__).where(ProductStyle.product_id.in_(ids)))
        conn.execute(insert(ProductStyle.__table__), styles)
        ins = insert(TagState.__table__)
        conn.execute(ins.on_conflict_do_update(index_elements=["product_id"],
                                               set_={"model_version": ins.excluded.model_version,
                                                     "status": ins.excluded.status,
                                                     "updated_at": ins.excluded.updated_at}), states)
        conn.execute(text("SELECT 1"))
    dt = time.perf_counter() - t0
    print(json.dumps({"products": len(rows), "seconds": dt, "images_per_s": len(rows) / dt,
                      "workers": args.workers, "batch": args.batch, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
