"""Stage rates, each stage alone (images/s): fetch (file:// and S3 via a moto server), decode+resize
(PNG 28 px; JPEG 512 px with and without PIL draft), model forward at batch 1/32/128/256, tag write
to PostgreSQL and to SQLite. These are the terms of the end-to-end bound 1 / sum(1 / rate_i).

Each stage runs the way the pipeline runs it: fetch and decode on a pool of ``fetch_threads``
threads, the model through ``Predictor.predict`` with the process's torch threads, the write as one
transaction per batch through ``catalog.tags.write_batch``.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench import common as C

NAME = "stages"


def _best(fn, repeats: int) -> float:
    """Best-of-N seconds (these machines are shared: the minimum is the least disturbed)."""
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fetch_rate(reader, uris: list[str], threads: int, repeats: int = 2) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(reader.get, uris[: min(len(uris), 64)]))  # warm connections / page cache

        def go():
            for _ in pool.map(reader.get, uris):
                pass

        return len(uris) / _best(go, repeats)


def decode_rate(blobs: list[bytes], size: int, channels: int, *, draft: bool = True, threads: int = 1,
                repeats: int = 2, spec=None) -> float:
    """Images/s of ``model.preprocess.decode_image``: ``spec`` (a PreprocessSpec), else the legacy spec of
    ``size`` and ``channels`` (a checkpoint without 'preprocess', e.g. the shipped one)."""
    from model.preprocess import PreprocessSpec, decode_image

    spec = spec or PreprocessSpec.from_checkpoint_meta({"channels": channels, "input_size": size})

    def one(b):
        return decode_image(b, spec, 40_000_000, draft=draft)

    if threads <= 1:
        def go():
            for b in blobs:
                one(b)
        return len(blobs) / _best(go, repeats)
    with ThreadPoolExecutor(threads) as pool:
        def go():
            for _ in pool.map(one, blobs):
                pass
        return len(blobs) / _best(go, repeats)


def model_rate(predictor, batch: int, images: int, repeats: int = 2, predict=None) -> float:
    """Images/s of ``predict`` (default ``predictor.predict``) on random uint8 batches."""
    predict = predict or predictor.predict
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, predictor.input_size, predictor.input_size, predictor.channels), np.uint8)
    predict(x)  # warm-up (allocator, oneDNN primitives)
    calls = max(1, images // batch)

    def go():
        for _ in range(calls):
            predict(x)

    return calls * batch / _best(go, repeats)


def model_rates(ctx, batch: int, images: int) -> dict[str, float]:
    """The model stage two ways: as the pipeline runs it (``Pipeline.predict``: on a CPU, the batch
    split over ``ctx.model_threads`` threads of one intra-op thread each) and as a plain
    ``Predictor.predict`` with torch's default intra-op threads. The bound takes the faster."""
    import torch

    from worker.pipeline import Pipeline

    pipeline = Pipeline(ctx)
    try:
        ours = model_rate(ctx.predictor, batch, images, predict=pipeline.predict)
    finally:
        pipeline.close()
    out = {"pipeline": ours}
    if ctx.predictor.device.type == "cpu" and ctx.model_threads > 1:
        before = torch.get_num_threads()
        torch.set_num_threads(ctx.model_threads)
        try:
            # capped: at small batches this mode can be 100x slower on a busy machine
            out["intra_op"] = model_rate(ctx.predictor, batch, min(images, 8 * batch), repeats=1)
        finally:
            torch.set_num_threads(before)
    out["best"] = max(out.values())
    return out


def synthetic_tags(ids: list[int], labels, tags_per_product: int = 4, seed: int = 0):
    """Predictions shaped like the model's: a primary coarse and fine pair plus runner-ups."""
    from catalog.tags import ProductTags, Tag

    rnd = random.Random(seed)
    out = []
    half = max(1, tags_per_product // 2)
    for pid in ids:
        cs = rnd.sample(labels.coarse_ids, min(half, len(labels.coarse_ids)))
        fs = rnd.sample(labels.fine_ids, min(tags_per_product - half, len(labels.fine_ids)))
        tags = [Tag(c, rnd.random(), i == 0) for i, c in enumerate(cs)] + [Tag(f, rnd.random(), i == 0)
                                                                           for i, f in enumerate(fs)]
        out.append(ProductTags(pid, "v1", tags))
    return out


def write_catalog(url: str, n: int) -> tuple[list[int], object, str]:
    """``n`` synthetic products, the taxonomy's labels and a registered model: (ids, labels, version)."""
    from datetime import UTC, datetime

    from sqlalchemy import func, insert, select

    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.models import register_model
    from catalog.schema import Product
    from model.taxonomy import load_taxonomy

    with session_scope(url) as s:
        labels = sync_labels(s, load_taxonomy("fashion-mnist"))
        register_model(s, "bench-writes", datetime(2024, 1, 1, tzinfo=UTC), "fashion-mnist", "none")
        have = s.execute(select(func.count()).select_from(Product)).scalar()
        if have < n:
            now = datetime.now(UTC)
            rows = [{"sku": f"w-{i:08d}", "title": "", "image_uri": f"file:///nowhere/{i}.png", "image_version": "v1",
                     "created_at": now, "updated_at": now} for i in range(have, n)]
            for i in range(0, len(rows), 5000):
                s.execute(insert(Product.__table__), rows[i : i + 5000])
    ids = C.product_ids(url, n)
    return ids, labels, "bench-writes"


def write_rate(url: str, n: int, batch: int = 256, tags_per_product: int = 4, passes: int = 2) -> dict:
    """Products/s through the pipeline's write (one transaction per batch, run counters, finish check).
    Pass 1 writes into empty tables, pass 2 re-tags the same products (the nightly case)."""
    from catalog.db import session_scope
    from catalog.runs import create_run, finish_if_complete
    from catalog.tags import write_batch

    ids, labels, version = write_catalog(url, n)
    C.reset_tags(url)
    tagged = synthetic_tags(ids, labels, tags_per_product)
    out = {}
    for p in range(passes):
        with session_scope(url) as s:
            run_id = create_run(s, kind="manual", scope="all", model_version=version).id
        t0 = time.perf_counter()
        for i in range(0, len(tagged), batch):
            with session_scope(url) as s:
                write_batch(s, run_id=run_id, model_version=version, tagged=tagged[i : i + batch], failed=[])
                finish_if_complete(s, run_id)
        out["first" if p == 0 else "retag"] = len(tagged) / (time.perf_counter() - t0)
    return out


def measure_bound_stages(kind: str, db_url: str, store_url: str, model: str, n: int,
                         threads: int | None = None, model_images: int | None = None) -> dict[str, float]:
    """The four stage rates that bound the end-to-end run of ``kind`` (used by bench.e2e too)."""
    from catalog.storage import ImageReader
    from worker.context import get_context

    settings = C.settings_for(db_url, store_url, model)
    threads = threads or settings.fetch_threads
    reader = ImageReader.from_settings(settings)
    uris = C.image_uris(db_url, n)
    ctx = get_context(settings)
    predictor = ctx.predictor
    blobs = [reader.get(u) for u in uris]
    images = model_images or max(settings.batch_size * 3, n // 2)
    rates = {
        "fetch": fetch_rate(reader, uris, threads),
        "decode": max(decode_rate(blobs, predictor.input_size, predictor.channels, threads=threads, spec=predictor.spec),
                      decode_rate(blobs, predictor.input_size, predictor.channels, threads=1, spec=predictor.spec)),
        "model": model_rates(ctx, settings.batch_size, images)["best"],
        "write": write_rate(C.pg_database("styletag_bench_writes"), max(n, 1024), settings.batch_size)["retag"],
    }
    return rates


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    res = C.Result(NAME, "Stage rates alone (images/s); the terms of the end-to-end bound")
    n_file = 256 if q else 2048
    n_s3 = 50 if q else 300
    n_write = 600 if q else 10_000
    from catalog.settings import Settings
    from catalog.storage import ImageReader, S3Store
    settings = Settings.from_env()
    threads = settings.fetch_threads
    res.parameters = {"model": C.model_info(model), "fetch_threads": threads, "batch_size": settings.batch_size,
                      "model_stage": "model_bsN: as the pipeline runs it (CPU: batch split over model_threads, "
                                     "1 intra-op thread each); _plain_intraopN: one call, N intra-op threads",
                      "images_file": n_file, "images_s3": n_s3, "write_products": n_write,
                      "tags_per_product": 4, "timing": "best of 2 passes"}
    figs = res.figures

    # fetch + decode, per kind
    kinds = {}
    for kind in C.KINDS:
        db, store = C.ensure_catalog(kind, n_file)
        uris = C.image_uris(db, n_file)
        reader = ImageReader((store + "/",), settings.max_image_bytes)
        kinds[kind] = (reader, uris)
        figs[f"fetch_file_{kind}"] = fetch_rate(reader, uris, threads)
        C.log(f"fetch file:// {kind}: {figs[f'fetch_file_{kind}']:.0f}/s")
    C.apply_env(C.styletag_env(*C.ensure_catalog("png28", n_file), model))
    from worker.context import get_context

    ctx = get_context(C.settings_for(*C.ensure_catalog("png28", n_file), model))
    predictor = ctx.predictor
    size, ch = predictor.input_size, predictor.channels
    png_blobs = [kinds["png28"][0].get(u) for u in kinds["png28"][1]]
    jpg_blobs = [kinds["jpeg512"][0].get(u) for u in kinds["jpeg512"][1]]
    figs["bytes_per_image_png28"] = sum(map(len, png_blobs)) / len(png_blobs)
    figs["bytes_per_image_jpeg512"] = sum(map(len, jpg_blobs)) / len(jpg_blobs)
    figs["decode_png28"] = decode_rate(png_blobs, size, ch, threads=threads, spec=predictor.spec)
    figs["decode_png28_1thread"] = decode_rate(png_blobs, size, ch, threads=1, spec=predictor.spec)
    figs["decode_jpeg512_draft"] = decode_rate(jpg_blobs, size, ch, threads=threads, spec=predictor.spec)
    figs["decode_jpeg512_draft_1thread"] = decode_rate(jpg_blobs, size, ch, threads=1, spec=predictor.spec)
    few = jpg_blobs[: max(50, len(jpg_blobs) // 4)]
    figs["decode_jpeg512_nodraft"] = decode_rate(few, size, ch, draft=False, threads=threads, spec=predictor.spec)
    figs["decode_jpeg512_nodraft_1thread"] = decode_rate(few, size, ch, draft=False, threads=1, spec=predictor.spec)
    C.log("decode: " + ", ".join(f"{k[7:]} {v:.0f}/s" for k, v in figs.items() if k.startswith("decode")))

    # S3 through a moto server subprocess
    moto = C.MotoServer()
    try:
        from catalog.storage import s3_client

        s3_client().create_bucket(Bucket="bench")
        store = S3Store("bench", "png28")
        with ThreadPoolExecutor(threads) as pool:
            s3_uris = list(pool.map(lambda i: (store.put(f"{i:05d}.png", png_blobs[i % len(png_blobs)],
                                                         "image/png"), store.uri_for(f"{i:05d}.png"))[1],
                                    range(n_s3)))
        reader = ImageReader(("s3://bench/png28/",), settings.max_image_bytes)
        figs["fetch_s3_png28"] = fetch_rate(reader, s3_uris, threads)
        C.log(f"fetch s3 (moto): {figs['fetch_s3_png28']:.0f}/s")
    finally:
        moto.stop()

    # model forward
    for bs in (1, 32, 128, 256):
        images = {1: 16 if q else 64, 32: 64 if q else 512, 128: 128 if q else 1024, 256: 256 if q else 1536}[bs]
        r = model_rates(ctx, bs, images)
        figs[f"model_bs{bs}"] = r["pipeline"]
        if "intra_op" in r:
            figs[f"model_bs{bs}_plain_intraop{ctx.model_threads}"] = r["intra_op"]
        C.log(f"model bs={bs}: {r}")

    # tag writes
    pg = write_rate(C.pg_database("styletag_bench_writes"), n_write, settings.batch_size)
    lite = write_rate(C.sqlite_catalog("bench-writes"), n_write, settings.batch_size)
    figs.update({"write_pg_first": pg["first"], "write_pg_retag": pg["retag"],
                 "write_sqlite_first": lite["first"], "write_sqlite_retag": lite["retag"]})
    C.log(f"write pg {pg}, sqlite {lite}")

    for key, value in figs.items():
        if key.startswith("bytes"):
            continue
        res.checks.append(C.check(key, value, unit="img/s", target="-", met=None))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
