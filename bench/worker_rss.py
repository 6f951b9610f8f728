"""Worker memory over a 10,000-product retag: a real ``styletag worker --gpus none --queues bulk``
tags 10,000 products (28 px PNG, PostgreSQL, file store) and its pool child's RSS is sampled against
the run's progress. Target: no growth batch after batch -- the RSS over the last quarter of the run
stays within 5 % of the RSS over the second quarter (the first quarter is warm-up: the allocator,
oneDNN's primitive cache and the thread pools reach their steady size there).
"""

from __future__ import annotations

import threading
import time

from bench import common as C

NAME = "worker_rss"


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    n = args.products or (512 if q else 10_000)
    res = C.Result(NAME, "Worker RSS over a long retag")
    db, store = C.ensure_catalog("png28", n)
    env = C.styletag_env(db, store, model)
    C.apply_env(env)
    settings = C.settings_for(db, store, model)
    res.parameters = {"products": n, "kind": "png28", "chunk": 1024, "batch_size": settings.batch_size,
                      "sample_interval_s": 0.25}
    C.reset_tags(db)
    C.flush_broker()
    samples: list[tuple[float, int, float]] = []  # (t, products done, rss MiB of the pool child)
    stop = threading.Event()
    with C.Worker(env, queues="bulk", log_name="worker-rss") as w:
        w.wait_ready()
        pool_child = max(pid for pid in w.pids() if "celery" in C.cmdline(pid))
        from sqlalchemy import text

        from catalog.db import engine_for

        engine = engine_for(db)

        def sample() -> None:
            t0 = time.perf_counter()
            with engine.connect() as conn:
                while not stop.is_set():
                    done = conn.execute(text("SELECT count(*) FROM tag_state")).scalar()
                    conn.rollback()
                    samples.append((time.perf_counter() - t0, int(done), C.rss_mib(pool_child)[0]))
                    stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        r = C.celery_retag(db, settings)
        stop.set()
        th.join()
        peak = C.rss_mib(pool_child)[1]
    total = r["products"]

    def window(lo: float, hi: float) -> float:
        vals = [rss for _, done, rss in samples if lo * total <= done <= hi * total and rss > 0]
        return max(vals) if vals else float("nan")

    q2, q4 = window(0.25, 0.5), window(0.75, 1.0)
    curve = [(round(t, 2), d, round(m, 1)) for t, d, m in samples]
    step = max(1, len(curve) // 60)
    res.figures = {"run": r, "peak_rss_mib": peak, "rss_second_quarter_mib": q2, "rss_last_quarter_mib": q4,
                   "rss_at_start_mib": samples[0][2] if samples else None, "curve_t_done_rss": curve[::step]}
    ratio = q4 / q2
    C.log(f"worker RSS: 2nd quarter {q2:.0f} MiB, last quarter {q4:.0f} MiB, peak {peak:.0f} MiB; {r['images_per_s']:.0f}/s")
    res.checks.append(C.check("worker RSS last vs 2nd quarter", q4, unit="MiB", baseline=q2,
                              baseline_label="2nd quarter", ratio=ratio, target="<= 1.05 x", met=ratio <= 1.05))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
