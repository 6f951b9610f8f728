"""Against the obvious alternatives, same model, same images, same database (PostgreSQL), same broker:

a. naive Celery (``bench.naive_app``): one task per product, single-image forward, one ORM insert and
   commit per tag row; a default-looking worker (prefork, concurrency = cores, one torch thread per
   child). Target: ours >= 5x.
b. the best single-process script (``bench.dataloader_script``): a torch DataLoader with worker
   processes reading the same store, batched forward, one bulk insert. Target: ours (through a real
   Celery worker) >= 0.95x of it. Runs alternate (script, ours, script, ours) and the best of each
   counts, so that a noisy neighbour does not decide the ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench import common as C

NAME = "alternatives"


def naive_rate(env: dict, db: str, ids: list[int]) -> dict:
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import TagState

    C.reset_tags(db)
    C.flush_broker()
    argv = [sys.executable, "-m", "celery", "--app", "bench.naive_app:app", "worker", "-Q", "naive", "--pool",
            "prefork", "--concurrency", str(C.machine()["cores"]), "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "-n", "naive@%h"]
    with C.Worker({**env, "STYLETAG_TORCH_THREADS": "1"}, argv=argv, log_name="naive", ready_marks=1) as w:
        w.wait_ready(model_marks=False)
        C.wait_until(lambda: w.text().count("naive model loaded") >= C.machine()["cores"], 120, what="naive models")
        from bench.naive_app import tag_one

        t0 = time.perf_counter()
        with tag_one.app.producer_or_acquire() as producer:
            for pid in ids:
                tag_one.apply_async(args=(pid,), producer=producer)

        def done() -> bool:
            with session_scope(db) as s:
                return s.execute(select(func.count()).select_from(TagState)).scalar() >= len(ids)

        C.wait_until(done, timeout=600, interval=0.1, what="naive tasks")
        dt = time.perf_counter() - t0
    return {"products": len(ids), "seconds": dt, "images_per_s": len(ids) / dt,
            "concurrency": C.machine()["cores"], "torch_threads_per_child": 1}


def dataloader_rate(db: str, model: str, n: int) -> dict:
    C.reset_tags(db)
    out = subprocess.run([sys.executable, "-m", "bench.dataloader_script", db, model, "--limit", str(n)],
                         capture_output=True, text=True, timeout=900, cwd=C.ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"dataloader script failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    p.add_argument("--naive-products", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    n = args.products or (256 if q else 2048)
    n_naive = args.naive_products or (16 if q else 200)
    repeats = args.repeats or (1 if q else 2)
    res = C.Result(NAME, "Ours vs naive Celery and vs a DataLoader script")
    res.parameters = {"model": C.model_info(model), "products": n, "naive_products": n_naive, "repeats": repeats,
                      "kind": "png28", "database": "PostgreSQL", "store": "file://"}
    kind = "png28"
    db, store = C.ensure_catalog(kind, n)
    env = C.styletag_env(db, store, model)
    C.apply_env(env)
    settings = C.settings_for(db, store, model)

    naive = naive_rate(env, db, C.product_ids(db, n_naive))
    res.figures["naive_celery"] = naive
    C.log(f"naive celery: {naive['images_per_s']:.1f}/s")

    dl_runs, ours_runs, inline_runs = [], [], []
    C.flush_broker()
    with C.Worker(env, queues="bulk", log_name="alternatives") as w:
        w.wait_ready()
        for _ in range(repeats):
            dl_runs.append(dataloader_rate(db, model, n))
            C.log(f"dataloader: {dl_runs[-1]['images_per_s']:.0f}/s")
            C.reset_tags(db)
            ours_runs.append(C.celery_retag(db, settings))
            C.log(f"ours (celery): {ours_runs[-1]['images_per_s']:.0f}/s")
    for _ in range(repeats):
        C.reset_tags(db)
        inline_runs.append(C.inline_retag(settings))
        C.log(f"ours (inline): {inline_runs[-1]['images_per_s']:.0f}/s")
    best = lambda runs: max(r["images_per_s"] for r in runs)  # noqa: E731
    dl, ours, inline = best(dl_runs), best(ours_runs), best(inline_runs)
    res.figures.update({"dataloader_runs": dl_runs, "ours_celery_runs": ours_runs, "ours_inline_runs": inline_runs,
                        "dataloader_best": dl, "ours_celery_best": ours, "ours_inline_best": inline})
    res.checks.append(C.check("ours celery vs naive celery", ours, unit="img/s", baseline=naive["images_per_s"],
                              baseline_label="naive", ratio=ours / naive["images_per_s"], target=">= 5 x",
                              met=ours / naive["images_per_s"] >= 5))
    res.checks.append(C.check("ours celery vs DataLoader script", ours, unit="img/s", baseline=dl,
                              baseline_label="dataloader", ratio=ours / dl, target=">= 0.95 x", met=ours / dl >= 0.95))
    res.checks.append(C.check("ours inline vs DataLoader script", inline, unit="img/s", baseline=dl,
                              baseline_label="dataloader", ratio=inline / dl, target="(info)", met=None))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
