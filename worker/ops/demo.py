"""``make demo``: the whole main job on the embedded default (SQLite + a local file store).

Imports the Fashion-MNIST test split (10,000 products), retags it inline with the shipped checkpoint,
then prints throughput, accuracy of the written tags against style_truth, failures and two
storefront queries with their answers.
"""

from __future__ import annotations

import json
import sys

from catalog.db import session_scope
from catalog.reports import truth_accuracy
from catalog.settings import Settings


def main() -> int:
    from catalog.importers import import_fashion_mnist
    from catalog.migrate import upgrade
    from catalog.queries import find_by_style, tags_for_sku
    from worker.ops.logs import configure_logging
    from worker.producers.retag import run_inline, start_run

    configure_logging("WARNING")
    settings = Settings.from_env()
    print(f"styletag demo: catalog {settings.database_url}, images {settings.store_url}")
    upgrade(settings.database_url)
    print("1/4 database migrated to head")
    rep = import_fashion_mnist(settings.database_url, settings.store_url, "test", progress=True)
    print(f"2/4 imported Fashion-MNIST test split: {rep}")
    run_id = start_run(settings, scope="all", kind="manual")
    report = run_inline(settings, run_id, progress=True)
    rate = report.products / report.wall_s if report.wall_s else 0.0
    print(f"3/4 run {run_id}: tagged {report.tagged}, failed {report.failed} of {report.products} products "
          f"in {report.wall_s:.1f}s = {rate:.0f} images/s (batches of {settings.batch_size})")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
    print(f"    stage time (summed over threads): {stages}")
    acc = truth_accuracy(settings.database_url, run_id)
    print(f"4/4 accuracy of the written tags against style_truth: fine {acc['fine']['accuracy']:.2%} "
          f"({acc['fine']['products']} products), coarse {acc['coarse']['accuracy']:.2%}; failures: {report.failed}")
    with session_scope(settings.database_url) as session:
        rows, cursor = find_by_style(session, "sneaker", level="fine", min_score=0.9, limit=5)
        print("\n$ styletag find --style sneaker --min-score 0.9 --limit 5 --json")
        print(json.dumps({"items": rows, "next": cursor}, indent=1, default=str))
        print("\n$ styletag tags fmnist-test-00000 --json")
        print(json.dumps(tags_for_sku(session, "fmnist-test-00000"), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
