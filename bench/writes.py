"""Tag writes into PostgreSQL, products/s, through the pipeline's write path (``write_batch`` + run
counters + the finish check, one transaction per batch), 4 tags per product. Pass 1 writes into empty
tables, pass 2 re-tags the same products (the nightly case). Target: >= 10,000 products/s, so that
the write stage never limits a GPU worker.
"""

from __future__ import annotations

from bench import common as C
from bench.stages import write_rate

NAME = "writes"
TARGET = 10_000


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--products", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    n = args.products or (1000 if q else 20_000)
    from catalog.settings import Settings

    batch = Settings.from_env().batch_size
    res = C.Result(NAME, "Tag writes into PostgreSQL (products/s)")
    res.parameters = {"products": n, "batch_size": batch, "tags_per_product": 4, "database": "PostgreSQL",
                      "path": "catalog.tags.write_batch, one transaction per batch"}
    url = C.pg_database("styletag_bench_writes")
    for b in sorted({batch, 1024}):
        r = write_rate(url, n, b)
        res.figures[f"batch_{b}"] = r
        C.log(f"writes batch {b}: {r}")
    r = res.figures[f"batch_{batch}"]
    worst = min(r.values())
    res.checks.append(C.check(f"PG writes, batch {batch} (worse of first/retag)", worst, unit="products/s",
                              target=f">= {TARGET}", met=worst >= TARGET))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
