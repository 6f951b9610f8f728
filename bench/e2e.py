"""End to end, images/s from product ids to committed tags: inline (``retag --all --inline``) and
through a real Celery worker (``styletag worker --gpus none --queues bulk`` + ``retag --all``), for
28 px PNGs and 512 px JPEGs. Each is compared with the CPU bound 1 / sum(1 / rate_i) of its stages
(fetch, decode, model at the pipeline's batch size, write), measured just before it in this process.
Target: end-to-end >= 0.85 x bound.
"""

from __future__ import annotations

from bench import common as C
from bench.stages import measure_bound_stages

NAME = "e2e"
TARGET = 0.85


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    p.add_argument("--kinds", default=",".join(C.KINDS))
    p.add_argument("--modes", default="inline,celery")
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    n = args.products or (256 if q else 2048)
    res = C.Result(NAME, "End to end vs the CPU bound of the stages")
    from catalog.settings import Settings

    base = Settings.from_env()
    res.parameters = {"model": C.model_info(model), "products": n, "batch_size": base.batch_size,
                      "fetch_threads": base.fetch_threads, "chunk": 1024, "store": "file://",
                      "database": "PostgreSQL", "bound": "1 / sum(1/rate) of fetch, decode, model, write"}
    modes = args.modes.split(",")
    for kind in args.kinds.split(","):
        db, store = C.ensure_catalog(kind, n)
        env = C.styletag_env(db, store, model)
        C.apply_env(env)
        settings = C.settings_for(db, store, model)
        rates = measure_bound_stages(kind, db, store, model, n)
        bound = C.rate_bound(rates)
        res.figures[f"{kind}_stage_rates"] = {k: round(v, 1) for k, v in rates.items()}
        res.figures[f"{kind}_bound"] = bound
        C.log(f"{kind}: stages {res.figures[f'{kind}_stage_rates']} -> bound {bound:.0f}/s")
        if "inline" in modes:
            C.reset_tags(db)
            r = C.inline_retag(settings)
            res.figures[f"{kind}_inline"] = r
            ratio = r["images_per_s"] / bound
            res.checks.append(C.check(f"{kind} inline", r["images_per_s"], unit="img/s", baseline=bound,
                                      baseline_label="bound", ratio=ratio, target=f">= {TARGET} x bound",
                                      met=ratio >= TARGET and r["failed"] == 0))
            C.log(f"{kind} inline: {r['images_per_s']:.0f}/s ({ratio:.2f} x bound) stages {r['stage_seconds']}")
        if "celery" in modes:
            C.reset_tags(db)
            C.flush_broker()
            with C.Worker(env, queues="bulk", log_name=f"e2e-{kind}") as w:
                w.wait_ready()
                r = C.celery_retag(db, settings)
            res.figures[f"{kind}_celery"] = r
            ratio = r["images_per_s"] / bound
            res.checks.append(C.check(f"{kind} celery", r["images_per_s"], unit="img/s", baseline=bound,
                                      baseline_label="bound", ratio=ratio, target=f">= {TARGET} x bound",
                                      met=ratio >= TARGET and r["failed"] == 0))
            C.log(f"{kind} celery: {r['images_per_s']:.0f}/s ({ratio:.2f} x bound)")
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
