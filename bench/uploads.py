"""Uploads through a real worker (``styletag worker --gpus none --queues uploads,bulk``):

* latency of a lone upload: ``enqueue_upload_ids([id])`` until its tag_state row is committed
  (polled every 2 ms), p50 / p95 over 50 sequential uploads (``upload_latency_ms``). Target p95 <= 100 ms
  with the Fashion-MNIST model (an idle worker dispatches an upload at once, ``worker/batching.py``);
  ``--kind photo``: rendered JPEG product photos through the photo model (``bench.photo``'s catalog and
  checkpoint), target p95 <= 150 ms, result ``uploads-photo``;
* a burst of 1,000 uploads (one message each, micro-batched by the worker): throughput relative to
  the bulk path on the same 1,000 products (``retag --all`` on the ``bulk`` queue). Target >= 0.9x.
"""

from __future__ import annotations

import time

from bench import common as C

NAME = "uploads"
TARGET = 0.9
LONE_P95_MS = {"png28": 100.0, "photo": 150.0}


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--lone", type=int, default=None)
    p.add_argument("--burst", type=int, default=None)
    p.add_argument("--kind", choices=["png28", "photo"], default="png28",
                   help="photo: rendered JPEG photos through the photo model (bench.photo's catalog)")
    args = p.parse_args(argv)
    q = args.quick
    kind = args.kind
    n_lone = args.lone or (10 if q else 50)
    n_burst = args.burst or (128 if q else 1000)
    # exactly the burst's products, so that the bulk run (retag --all) tags the same ones
    if kind == "photo":
        from bench.photo import ensure_photo_catalog, photo_model

        res = C.Result(f"{NAME}-photo", "Upload latency and burst throughput vs bulk, photo model")
        model = photo_model(args.model, res)
        db, store = ensure_photo_catalog(max(n_burst, n_lone), model)
    else:
        res = C.Result(NAME, "Upload latency and burst throughput vs bulk")
        model = C.model_path(args.model)
        db, store = C.ensure_catalog("png28", max(n_burst, n_lone))
    env = C.styletag_env(db, store, model)
    C.apply_env(env)
    settings = C.settings_for(db, store, model)
    from worker.app import UPLOAD_FLUSH_EVERY, UPLOAD_FLUSH_INTERVAL
    from worker.producers.uploads import enqueue_upload_ids

    res.parameters = {"lone_uploads": n_lone, "burst": n_burst, "kind": kind, "model": C.model_info(model),
                      "upload_batch": UPLOAD_FLUSH_EVERY, "upload_interval_s": UPLOAD_FLUSH_INTERVAL,
                      "batch_size": settings.batch_size}
    ids = C.product_ids(db, max(n_burst, n_lone))
    C.reset_tags(db)
    C.flush_broker()
    conn = C.pg_connect(db, autocommit=True)

    def tagged(pid: int) -> bool:
        return conn.execute("SELECT 1 FROM tag_state WHERE product_id = %s", (pid,)).fetchone() is not None

    def count() -> int:
        return conn.execute("SELECT count(*) FROM tag_state").fetchone()[0]

    def burst_run(w) -> tuple[float, float]:
        C.reset_tags(db)
        t0 = time.perf_counter()
        enqueue_upload_ids(burst, settings)
        t_enq = time.perf_counter() - t0
        C.wait_until(lambda: count() >= len(burst), 600, 0.02, "burst tagged")
        return time.perf_counter() - t0, t_enq

    burst = ids[:n_burst]
    with C.Worker(env, queues="uploads,bulk", log_name="uploads") as w:
        w.wait_ready()
        # warm the uploads process (first batch pays lazy imports and the first forward)
        enqueue_upload_ids([ids[-1]], settings)
        C.wait_until(lambda: tagged(ids[-1]), 120, 0.01, "warm-up upload")
        lat = []
        for pid in ids[:n_lone]:
            t0 = time.perf_counter()
            enqueue_upload_ids([pid], settings)
            C.wait_until(lambda pid=pid: tagged(pid), 60, 0.002, "upload tagged")
            lat.append((time.perf_counter() - t0) * 1000)
        t_burst, t_enq = burst_run(w)
        C.reset_tags(db)
        bulk = C.celery_retag(db, settings)
    # the same burst with micro-batches as large as the model's batch (an operator setting)
    big = str(settings.batch_size)
    with C.Worker({**env, "STYLETAG_UPLOAD_BATCH": big}, queues="uploads", log_name="uploads-big") as w:
        w.wait_ready()
        enqueue_upload_ids([ids[-1]], settings)
        C.wait_until(lambda: tagged(ids[-1]), 120, 0.01, "warm-up upload")
        t_big, _ = burst_run(w)
    burst_rate = len(burst) / t_burst
    ratio = burst_rate / bulk["images_per_s"]
    res.figures = {"upload_latency_ms": {"p50": C.pct(lat, 50), "p95": C.pct(lat, 95), "max": max(lat), "all": lat},
                   "burst": {"products": len(burst), "seconds": t_burst, "enqueue_seconds": t_enq,
                             "images_per_s": burst_rate},
                   "bulk": bulk,
                   f"burst_upload_batch_{big}": {"seconds": t_big, "images_per_s": len(burst) / t_big,
                                                  "ratio_to_bulk": len(burst) / t_big / bulk["images_per_s"]}}
    C.log(f"lone p50 {C.pct(lat, 50):.0f} ms p95 {C.pct(lat, 95):.0f} ms; burst {burst_rate:.0f}/s vs bulk "
          f"{bulk['images_per_s']:.0f}/s ({ratio:.2f})")
    res.checks.append(C.check(f"upload_latency lone p95 ({kind})", C.pct(lat, 95), unit="ms", baseline=C.pct(lat, 50),
                              baseline_label="p50", target=f"<= {LONE_P95_MS[kind]:.0f} ms",
                              met=C.pct(lat, 95) <= LONE_P95_MS[kind]))
    res.checks.append(C.check(f"burst of {len(burst)} vs bulk", burst_rate, unit="img/s",
                              baseline=bulk["images_per_s"], baseline_label="bulk", ratio=ratio,
                              target=f">= {TARGET} x", met=ratio >= TARGET and bulk["failed"] == 0))
    res.checks.append(C.check(f"burst, STYLETAG_UPLOAD_BATCH={big}", len(burst) / t_big, unit="img/s",
                              baseline=bulk["images_per_s"], baseline_label="bulk",
                              ratio=len(burst) / t_big / bulk["images_per_s"], target="(info)", met=None))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
