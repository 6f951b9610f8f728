"""Catalog intake on PostgreSQL: ``styletag import catalog`` of a CSV of N rows (sku, title, image_uri,
label:fine) into an empty catalog (run 1) and again (run 2, nothing changes), with the image check (a HEAD
of every row's image, the default) and without it (``--skip-image-check``); the image check that
``retag --changed-only`` runs first (images/s); and the Fashion-MNIST photo renderer (photos/s, 2 processes).

    python -m bench.intake [--rows 100000] [--photos 200] [--quick]
"""

from __future__ import annotations

import os
import time

from bench import common as C

NAME = "intake"


def _image_key(i: int) -> str:
    return f"img/{i // 1000:04d}/{i:08d}.jpg"


def _csv(path, n: int, store) -> None:
    """One row per product, each with its own image file (1,000 per folder)."""
    fine = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("sku,title,image_uri,label:fine\n")
        for i in range(n):
            fh.write(f"SKU-{i:08d},Product {i},{store.uri_for(_image_key(i))},{fine[i % 10]}\n")


def _images(folder, n: int) -> None:
    for i in range(n):
        path = folder / _image_key(i)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(f"photo {i} ".encode() * 20)


def _import(url: str, csv_path, settings, *, check: bool) -> dict:
    from catalog.importers.catalog_file import import_catalog_file

    t0, c0 = time.perf_counter(), time.process_time()
    r = import_catalog_file(csv_path, settings=settings, taxonomy="fashion-mnist", check_images=check)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # cpu: this process's CPU seconds (not the server's): on a shared machine, rows per CPU second says what
    # one idle core would do for the client side
    return {"rows": r.rows, "inserted": r.inserted, "updated": r.updated, "unchanged": r.unchanged,
            "rejected": len(r.rejected), "truth_added": r.truth_added, "seconds": round(wall, 2),
            "rows_per_s": round(r.rows / wall), "cpu_seconds": round(cpu, 2), "rows_per_cpu_s": round(r.rows / cpu),
            "load_1m": round(os.getloadavg()[0], 1)}


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--photos", type=int, default=None)
    args = p.parse_args(argv)
    q = args.quick
    n = args.rows or (2000 if q else 100_000)
    n_photos = args.photos if args.photos is not None else (10 if q else 200)
    from dataclasses import replace

    from catalog.db import session_scope
    from catalog.labels import sync_labels
    from catalog.products import refresh_image_versions
    from catalog.settings import Settings
    from catalog.storage import open_store
    from model.taxonomy import load_taxonomy

    res = C.Result(NAME, "Catalog intake on PostgreSQL (rows/s) and photo rendering (photos/s)")
    folder = C.WORK / "intake-images"
    store = open_store(folder.as_uri())
    _images(folder, n)
    csv_path = C.WORK / f"intake-{n}.csv"
    _csv(csv_path, n, store)
    base = Settings.from_env()
    res.parameters = {"rows": n, "images": "one file per row", "batch_size": 1000,
                      "fetch_threads": base.fetch_threads, "database": "PostgreSQL", "store": "file://",
                      "path": "catalog.importers.catalog_file.import_catalog_file (what the CLI runs)"}
    for check in (True, False):
        url = C.pg_database("styletag_bench_intake", fresh=True)
        settings = replace(base, database_url=url, store_url=store.url, allowed_image_prefixes=(store.url + "/",))
        with session_scope(url) as s:
            sync_labels(s, load_taxonomy("fashion-mnist"))
        key = "image_check" if check else "skip_image_check"
        first = _import(url, csv_path, settings, check=check)
        second = _import(url, csv_path, settings, check=check)
        res.figures[key] = {"first": first, "second": second}
        C.log(f"import {key}: first {first}, second {second}")
        if check:
            t0 = time.perf_counter()
            r = refresh_image_versions(settings)
            wall = time.perf_counter() - t0
            res.figures["image_check_pass"] = {**r.as_dict(), "images_per_s": round(r.checked / wall)}
            C.log(f"image check pass: {res.figures['image_check_pass']}")
    if n_photos:
        from catalog.importers.photos import render_fashion_mnist_photos

        url = C.pg_database("styletag_bench_intake", fresh=True)
        photo_store = C.WORK / "intake-photos"
        settings = replace(base, database_url=url, store_url=photo_store.as_uri(),
                           allowed_image_prefixes=(photo_store.as_uri() + "/",))
        import resource
        import shutil

        shutil.rmtree(photo_store, ignore_errors=True)
        for run in ("first", "second"):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = render_fashion_mnist_photos("test", C.WORK / "intake-photos.csv", settings=settings, limit=n_photos,
                                            procs=2, progress=False)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's processes, once they exited
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            res.figures[f"photos_{run}"] = {"photos": r.total, "written": r.written, "render_seconds": r.render_seconds,
                                           "photos_per_s": round(r.photos_per_s, 1),
                                           "pool_cpu_ms_per_photo": round(1000 * cpu / r.total, 1),
                                           "load_1m": round(os.getloadavg()[0], 1),
                                           "imported": {k: r.imported[k] for k in ("inserted", "unchanged")}}
            C.log(f"photos {run}: {res.figures[f'photos_{run}']}")
    second = res.figures["image_check"]["second"]["rows_per_s"]
    res.checks.append(C.check(f"import {n} rows, second run (image check on)", second, unit="rows/s",
                              target=">= 2,000", met=second >= 2000))
    res.write(q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
