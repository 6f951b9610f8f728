"""End to end, images/s from product ids to committed tags: inline (``retag --all --inline``) and
through a real Celery worker (``styletag worker --gpus none --queues bulk`` + ``retag --all``), for
28 px PNGs and 512 px JPEGs. Each is compared with the CPU bound 1 / sum(1 / rate_i) of its stages
(fetch, decode, model at the pipeline's batch size, write), measured in this process before and after
the runs (each stage at its better figure); each run twice, the better counts.
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
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    n = args.products or (256 if q else 2048)
    repeats = args.repeats or (1 if q else 2)
    res = C.Result(NAME, "End to end vs the CPU bound of the stages")
    from catalog.settings import Settings

    base = Settings.from_env()
    res.parameters = {"model": C.model_info(model), "products": n, "batch_size": base.batch_size,
                      "fetch_threads": base.fetch_threads, "chunk": 1024, "store": "file://",
                      "database": "PostgreSQL", "bound": "1 / sum(1/rate) of fetch, decode, model, write; each stage the best of a measurement "
                                "before and one after the runs", "repeats": repeats, "timing": "best of the repeats"}
    modes = args.modes.split(",")
    for kind in args.kinds.split(","):
        db, store = C.ensure_catalog(kind, n)
        env = C.styletag_env(db, store, model)
        C.apply_env(env)
        settings = C.settings_for(db, store, model)
        before = measure_bound_stages(kind, db, store, model, n)
        runs: dict[str, list[dict]] = {"inline": [], "celery": []}
        if "inline" in modes:
            for _ in range(repeats):
                C.reset_tags(db)
                runs["inline"].append(C.inline_retag(settings))
                C.log(f"{kind} inline: {runs['inline'][-1]['images_per_s']:.0f}/s")
        if "celery" in modes:
            C.flush_broker()
            with C.Worker(env, queues="bulk", log_name=f"e2e-{kind}") as w:
                w.wait_ready()
                for _ in range(repeats):
                    C.reset_tags(db)
                    runs["celery"].append(C.celery_retag(db, settings))
                    C.log(f"{kind} celery: {runs['celery'][-1]['images_per_s']:.0f}/s")
        after = measure_bound_stages(kind, db, store, model, n)
        # each stage at its best of the two measurements: the bound is the optimistic one
        rates = {k: max(before[k], after[k]) for k in before}
        bound = C.rate_bound(rates)
        res.figures[f"{kind}_stage_rates"] = {k: round(v, 1) for k, v in rates.items()}
        res.figures[f"{kind}_stage_rates_before_after"] = {"before": before, "after": after}
        res.figures[f"{kind}_bound"] = bound
        C.log(f"{kind}: stages {res.figures[f'{kind}_stage_rates']} -> bound {bound:.0f}/s")
        for mode, rs in runs.items():
            if not rs:
                continue
            best = max(rs, key=lambda r: r["images_per_s"])
            res.figures[f"{kind}_{mode}"] = best
            res.figures[f"{kind}_{mode}_runs"] = rs
            ratio = best["images_per_s"] / bound
            res.checks.append(C.check(f"{kind} {mode}", best["images_per_s"], unit="img/s", baseline=bound,
                                      baseline_label="bound", ratio=ratio, target=f">= {TARGET} x bound",
                                      met=ratio >= TARGET and best["failed"] == 0))
            C.log(f"{kind} {mode}: best {best['images_per_s']:.0f}/s ({ratio:.2f} x bound)")
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
