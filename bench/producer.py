"""Scale with catalog size: the retag producer (``retag --all``: keyset-scan the ids, grow the run's
total, send chunks of 1,024 ids to the ``bulk`` queue) on 10,000 vs 1,000,000 products. Each runs in
a fresh subprocess that reports its enqueue rate and its peak RSS (``getrusage``). No worker runs:
the messages stay in Redis database 15, which is flushed before and after. Target: peak RSS at 1M
<= 1.2 x peak RSS at 10k.

    python -m bench.producer child DATABASE_URL   # one measurement (used by main)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from bench import common as C

NAME = "producer"


def child(db_url: str) -> None:
    from datetime import UTC, datetime

    import redis

    from catalog.db import session_scope
    from catalog.models import register_model
    from catalog.settings import Settings
    from worker.producers.retag import enqueue_run, start_run

    settings = Settings.from_env()
    with session_scope(settings.database_url) as session:  # a run names a registered model (no worker runs)
        register_model(session, "bench-producer", datetime(2026, 1, 1, tzinfo=UTC), "fashion-mnist", "resnet-small")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run_id = start_run(settings, scope="all", model_version="bench-producer")
    t0 = time.perf_counter()
    sent = enqueue_run(settings, run_id)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queued = redis.Redis.from_url(settings.broker_url).llen("bulk")
    print(json.dumps({"products": sent, "seconds": dt, "products_per_s": sent / dt, "messages": queued,
                      "rss_after_imports_mib": base_rss, "peak_rss_mib": peak}))


def products_db(n: int, name: str) -> str:
    from bench.queries import build_catalog

    return build_catalog(n, name)


def measure(db_url: str, model: str) -> dict:
    C.flush_broker()
    env = {**os.environ, **C.styletag_env(db_url, "file:///nowhere", model)}
    out = subprocess.run([sys.executable, "-m", "bench.producer", "child", db_url], env=env, capture_output=True,
                         text=True, timeout=900, cwd=C.ROOT)
    C.flush_broker()
    if out.returncode != 0:
        raise RuntimeError(f"producer failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "child":
        child(sys.argv[2])
        return 0
    p = C.parser(NAME, __doc__)
    args = p.parse_args(argv)
    q = args.quick
    model = C.model_path(args.model)
    small, large = (1_000, 20_000) if q else (10_000, 1_000_000)
    res = C.Result(NAME, "Retag producer: enqueue rate and peak RSS vs catalog size")
    res.parameters = {"small": small, "large": large, "chunk": 1024, "page": 1000, "scope": "all",
                      "broker": C.broker_url(), "workers": "none (messages stay queued)"}
    from bench.queries import DB

    db_small = products_db(small, f"styletag_bench_products_{small}")
    db_large = products_db(large, f"{DB}_quick" if q else DB)
    r_small = measure(db_small, model)
    C.log(f"producer {small}: {r_small}")
    r_large = measure(db_large, model)
    C.log(f"producer {large}: {r_large}")
    res.figures = {f"products_{small}": r_small, f"products_{large}": r_large}
    ratio = r_large["peak_rss_mib"] / r_small["peak_rss_mib"]
    res.checks.append(C.check(f"peak RSS {large:,} vs {small:,}", r_large["peak_rss_mib"], unit="MiB",
                              baseline=r_small["peak_rss_mib"], baseline_label=f"{small:,}", ratio=ratio,
                              target="<= 1.2 x", met=ratio <= 1.2))
    res.checks.append(C.check(f"enqueue rate {large:,}", r_large["products_per_s"], unit="products/s",
                              baseline=r_small["products_per_s"], baseline_label=f"{small:,}",
                              ratio=r_large["products_per_s"] / r_small["products_per_s"], target="(info)", met=None))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
