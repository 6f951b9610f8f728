"""Fashion-MNIST as a photo catalog to develop against (``styletag import fashion-mnist --render photo``).

Each item is rendered as a colour product photo (``model.render.render_photo``: 600-1000 px, light studio
backdrop, a palette colour and texture, varied size and placement), saved as JPEG (quality 90) into the
store, and listed in a CSV that ``styletag import catalog`` takes, with its true labels: coarse, fine and
the garment's 1-2 colours. The CSV is then imported through that same path (taxonomy ``fashion-mnist``,
whose colour labels are the renderer's palette).

Deterministic: item ``i`` of a split is rendered from ``default_rng([SPLIT_CODE[split], i])`` (the streams
of dev/photo_proto.py), so a re-run produces the same bytes and ``put_if_changed`` rewrites nothing.
Rendering runs in a process pool (spawned, ``procs`` processes); each process loads the split once and
writes its own photos.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catalog.errors import StyletagError
from catalog.settings import Settings
from model.parallel import pool_map

SPLIT_CODE = {"train": 1, "test": 2}
SKU_PREFIX = "fmnist-photo"
TAXONOMY = "fashion-mnist"
QUALITY = 90
CHUNK = 50  # items per task of the pool
CSV_COLUMNS = ("sku", "title", "image_uri", "image_version", "label:coarse", "label:fine", "label:colour")


@dataclass
class PhotoReport:
    split: str
    total: int = 0
    written: int = 0  # photos written (new or changed bytes)
    kept: int = 0  # already in the store with the same bytes
    bytes_written: int = 0
    render_seconds: float = 0.0
    csv: str = ""
    imported: dict = field(default_factory=dict)  # the import report of the CSV

    @property
    def photos_per_s(self) -> float:
        return self.total / self.render_seconds if self.render_seconds else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "photos_per_s": round(self.photos_per_s, 1)}


def photo_key(split: str, i: int) -> str:
    return f"{SKU_PREFIX}/{split}/{i:05d}.jpg"


def photo_sku(split: str, i: int) -> str:
    return f"{SKU_PREFIX}-{split}-{i:05d}"


def render_jpeg(item28: np.ndarray, split: str, i: int, quality: int = QUALITY) -> tuple[bytes, tuple[str, ...]]:
    """The JPEG bytes of item ``i`` of ``split`` and its colours; the same bytes every time."""
    from model.render import render_photo

    photo = render_photo(item28, np.random.default_rng([SPLIT_CODE[split], i]))
    buf = io.BytesIO()
    photo.image.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), tuple(photo.colours)


_STATE: dict = {}


def _init(split: str, source: str | None, store_url: str, settings: Settings) -> None:
    from catalog.storage import open_store
    from model.fmnist import load_split

    _STATE["images"] = load_split(split, source)[0]
    _STATE["store"] = open_store(store_url, settings)


def _render_range(job: tuple[str, int, int, int]) -> list[tuple[int, str, str, bool, int, tuple[str, ...]]]:
    """(index, uri, version, written, bytes, colours) of items [start, stop), each put into the store."""
    split, start, stop, quality = job
    images, store = _STATE["images"], _STATE["store"]
    out = []
    for i in range(start, stop):
        data, colours = render_jpeg(images[i], split, i, quality)
        key = photo_key(split, i)
        info, written = store.put_if_changed(key, data, content_type="image/jpeg")
        out.append((i, store.uri_for(key), info.version, written, len(data), colours))
    return out


def render_fashion_mnist_photos(
    split: str,
    out_csv: str | Path,
    *,
    settings: Settings | None = None,
    store_url: str | None = None,
    limit: int | None = None,
    source: str | None = None,
    procs: int = 2,
    quality: int = QUALITY,
    progress: bool = True,
    do_import: bool = True,
) -> PhotoReport:
    """Render the first ``limit`` items of ``split`` into the store, write the CSV, import it (see the
    module doc). Returns counts, photos/s of the rendering, and the import's report."""
    from catalog.storage import open_store
    from model.fmnist import CLASSES, load_split
    from model.taxonomy import load_taxonomy

    if split not in SPLIT_CODE:
        raise StyletagError(f"unknown split {split!r}; use train or test")
    if not 1 <= quality <= 95:
        raise StyletagError(f"JPEG quality must be between 1 and 95, got {quality}")
    settings = settings or Settings.from_env()
    store_url = store_url or settings.store_url
    open_store(store_url, settings)  # a bad store URL fails here, not in every pool process
    try:
        _, labels = load_split(split, source)
    except ValueError as exc:
        raise StyletagError(str(exc)) from None
    n = len(labels) if limit is None else min(limit, len(labels))
    taxonomy = load_taxonomy(TAXONOMY)
    report = PhotoReport(split=split, total=n, csv=str(out_csv))
    jobs = [(split, lo, min(lo + CHUNK, n), quality) for lo in range(0, n, CHUNK)]
    started = time.perf_counter()
    rows = pool_map(_render_range, jobs, procs, _init, (split, source, store_url, settings), total=n,
                    desc=f"render {split}", progress=progress, unit="photo")
    report.render_seconds = round(time.perf_counter() - started, 3)
    report.written = sum(1 for r in rows if r[3])
    report.kept = n - report.written
    report.bytes_written = sum(r[4] for r in rows if r[3])

    fine_index = {name: j for j, name in enumerate(taxonomy.fine.labels)}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, uri, version, _, _, colours in rows:
        fine = CLASSES[int(labels[i])]
        coarse = "|".join(taxonomy.coarse.labels[c] for c in taxonomy.parents[fine_index[fine]])
        title = f"{' and '.join(colours)} {fine} #{i}"
        writer.writerow((photo_sku(split, i), title, uri, version, coarse, fine, "|".join(colours)))
    path = Path(out_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(out.getvalue(), encoding="utf-8")
    os.replace(tmp, path)
    if do_import:
        report.imported = import_photo_csv(path, settings, progress=progress).as_dict()
    return report


def import_photo_csv(path: Path, settings: Settings, *, progress: bool = False):
    """Apply the fashion-mnist labels and the palette's colour labels, then import the CSV (its rows carry
    the versions the store reported, so no image is read again)."""
    from catalog.db import session_scope
    from catalog.importers.catalog_file import import_catalog_file
    from catalog.labels import sync_colour_labels, sync_labels
    from model.colour import NAMES
    from model.taxonomy import load_taxonomy

    with session_scope(settings.database_url) as session:
        sync_labels(session, load_taxonomy(TAXONOMY))
        sync_colour_labels(session, TAXONOMY, list(NAMES))
    return import_catalog_file(path, settings=settings, taxonomy=TAXONOMY, check_images=False, progress=progress)
