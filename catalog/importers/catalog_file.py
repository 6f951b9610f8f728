"""A shop's own catalog from a CSV or JSON Lines file (``styletag import catalog FILE``).

CSV: a header row with ``sku`` and ``image_uri``, optionally ``title``, ``image_version`` (an ETag the shop
knows; then no HEAD) and ``label:<level>`` columns (``label:fine``, ``label:coarse``, ``label:colour``;
several labels of one level separated by ``|``). JSON Lines: one object per line with the same keys and
``labels`` as an object (``{"fine": "sneaker", "colour": ["navy", "white"]}``). ``-`` reads stdin.

The file is read as bytes and decoded line by line, so a line that is not UTF-8 is rejected with its number
and the rest goes in. Every row goes through ``catalog.products.upsert_products`` (the one way in): checked,
batched, one transaction per batch, idempotent. ``archive_missing`` treats the file as the whole catalog.
"""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from catalog.errors import StyletagError
from catalog.product_rows import ProductInput, Rejection
from catalog.products import UpsertReport, archive_missing, upsert_products
from catalog.schema import LEVELS
from catalog.settings import Settings

FORMATS = ("csv", "jsonl")
COLUMNS = ("sku", "image_uri", "title", "image_version")
LABEL_PREFIX = "label:"
# Rejections that may hide which product a line was: with any of them, --archive-missing archives nothing.
SKU_UNKNOWN = ("invalid_utf8", "bad_row")


class ImportFileError(StyletagError):
    """The file as a whole cannot be imported (unreadable, no header, a required column missing)."""


@contextmanager
def _open(source: str | Path | BinaryIO) -> Iterator[tuple[BinaryIO, str, int | None]]:
    """(binary file, its name, its size when it is a regular file)."""
    if not isinstance(source, str | Path) or str(source) == "-":
        stream = sys.stdin.buffer if isinstance(source, str | Path) else source
        if not hasattr(stream, "peek"):  # the format is sniffed from the first bytes
            stream = io.BufferedReader(stream)
        yield stream, "<stdin>" if stream is sys.stdin.buffer else getattr(source, "name", "<stream>"), None
        return
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ImportFileError(f"cannot read {str(source)[:200]}: {exc.strerror or exc.__class__.__name__}") from None
    with fh:
        st = os.fstat(fh.fileno())
        yield fh, str(source), st.st_size if stat.S_ISREG(st.st_mode) else None


def detect_format(name: str, fh: BinaryIO, fmt: str | None) -> str:
    """``fmt`` if given, else by extension (.csv; .jsonl / .ndjson / .json), else by the first byte."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImportFileError(f"unknown format {fmt!r}; use csv or jsonl")
        return fmt
    suffix = Path(name).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    head = fh.peek(64)[:64] if hasattr(fh, "peek") else b""
    return "jsonl" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "csv"


def count_lines(fh: BinaryIO) -> int:
    """Physical lines of a regular file (the progress bar's total), then back to the start."""
    n, last = 0, b"\n"
    while chunk := fh.read(1 << 20):
        n += chunk.count(b"\n")
        last = chunk[-1:]
    fh.seek(0)
    return n + (last != b"\n")


class _Lines:
    """Physical lines decoded one at a time; a line that is not UTF-8 is recorded in ``bad`` and skipped.
    ``start`` is the number of the first line handed out since it was last reset (a CSV record's line)."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.no = 0
        self.start: int | None = None
        self.bad: list[Rejection] = []

    def __iter__(self) -> Iterator[str]:
        for raw in self.fh:
            self.no += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.bad.append(Rejection(self.no, None, "invalid_utf8",
                                          f"not UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start:exc.start + 1]!r})"))
                continue
            if self.no == 1:
                text = text.removeprefix("\ufeff")
            if self.start is None:
                self.start = self.no
            yield text


def read_csv(fh: BinaryIO, name: str, warnings: list[str]) -> tuple[Iterator[ProductInput | Rejection], list[str]]:
    """The rows of a CSV catalog and the levels of its label columns; ImportFileError if the header is
    unusable (read before anything is written)."""
    lines = _Lines(fh)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFileError(f"{name}: empty file; a catalog CSV starts with a header "
                              "(sku,image_uri[,title][,image_version][,label:<level>...])") from None
    except csv.Error as exc:
        raise ImportFileError(f"{name}: the header is not CSV ({exc})") from None
    if lines.bad and lines.bad[0].line == 1:
        raise ImportFileError(f"{name}: the header line is not UTF-8 text; save the file as UTF-8")
    header = [h.strip() for h in header]
    index = {h: i for i, h in enumerate(header)}
    missing = [c for c in ("sku", "image_uri") if c not in index]
    if missing:
        raise ImportFileError(f"{name}: no {' or '.join(repr(c) for c in missing)} column in the header "
                              f"(columns: {', '.join(header)[:200]}); a catalog needs sku and image_uri")
    if len(index) != len(header):
        raise ImportFileError(f"{name}: a column name appears twice in the header")
    label_cols = {h[len(LABEL_PREFIX):].strip(): i for h, i in index.items() if h.startswith(LABEL_PREFIX)}
    unknown_levels = [lv for lv in label_cols if lv not in LEVELS]
    if unknown_levels:
        raise ImportFileError(f"{name}: column 'label:{unknown_levels[0][:40]}': the levels are "
                              f"{', '.join(LEVELS)}")
    ignored = [h for h in header if h not in COLUMNS and not h.startswith(LABEL_PREFIX)]
    if ignored:
        warnings.append(f"ignored columns: {', '.join(ignored)[:300]}")
    cols = {c: index.get(c) for c in COLUMNS}

    def rows() -> Iterator[ProductInput | Rejection]:
        width = len(header)
        while True:
            lines.start = None
            try:
                record: list[str] | csv.Error | None = next(reader)
            except StopIteration:
                record = None
            except csv.Error as exc:
                record = exc
            while lines.bad:  # lines skipped on the way (not UTF-8)
                yield lines.bad.pop(0)
            line = lines.start or lines.no
            if record is None:
                break
            if isinstance(record, csv.Error):
                yield Rejection(line, None, "bad_row", f"not CSV: {record}")
                continue
            if not record or not any(cell.strip() for cell in record):
                continue
            if len(record) != width:
                yield Rejection(line, None, "bad_row", f"{len(record)} fields, the header has {width}")
                continue
            labels = {level: record[i] for level, i in label_cols.items()} if label_cols else None
            yield ProductInput(
                sku=record[cols["sku"]], image_uri=record[cols["image_uri"]],
                title=None if cols["title"] is None else record[cols["title"]],
                image_version=None if cols["image_version"] is None else record[cols["image_version"]],
                labels=labels, line=line,
            )

    return rows(), list(label_cols)


def read_jsonl(fh: BinaryIO, warnings: list[str]) -> Iterator[ProductInput | Rejection]:
    """The rows of a JSON Lines catalog: one object per line; anything else is that line's rejection."""
    ignored: set[str] = set()
    for no, raw in enumerate(fh, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Rejection(no, None, "invalid_utf8", f"not UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if no == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Rejection(no, None, "bad_row", f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        except (RecursionError, ValueError) as exc:
            yield Rejection(no, None, "bad_row", f"not JSON: {exc.__class__.__name__}")
            continue
        if not isinstance(obj, dict):
            yield Rejection(no, None, "bad_row", f"a line must be a JSON object, got {type(obj).__name__}")
            continue
        extra = set(obj) - {*COLUMNS, "labels"} - ignored
        if extra:
            ignored |= extra
            warnings.append(f"line {no}: ignored keys: {', '.join(sorted(extra))[:200]}")
        yield ProductInput.from_mapping(obj, no)


def import_catalog_file(
    source: str | Path | BinaryIO,
    *,
    settings: Settings | None = None,
    taxonomy: str | None = None,
    fmt: str | None = None,
    strict: bool = False,
    archive_missing_products: bool = False,
    check_images: bool = True,
    batch_size: int = 1000,
    progress: bool = False,
) -> UpsertReport:
    """Import a catalog file (see the module doc); returns the report (rejections with their lines).
    ``strict``: any rejection aborts with nothing written (RowsRejected). ``archive_missing_products``:
    products the file does not name are archived afterwards (not when a rejected line may have named one)."""
    settings = settings or Settings.from_env()
    warnings: list[str] = []
    with _open(source) as (fh, name, size):
        kind = detect_format(name, fh, fmt)
        total = None
        if size is not None and hasattr(fh, "seek"):
            total = max(0, count_lines(fh) - (kind == "csv"))
        if kind == "csv":
            rows, levels = read_csv(fh, name, warnings)
            if levels:
                _check_levels(settings, taxonomy, levels, name)
        else:
            rows = read_jsonl(fh, warnings)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="rows", desc=f"import {Path(name).name}"[:40], file=sys.stderr,
                       dynamic_ncols=True, smoothing=0.1)
        try:
            report = upsert_products(rows, settings=settings, taxonomy=taxonomy, check_images=check_images,
                                     strict=strict, batch_size=batch_size, collect_skus=archive_missing_products,
                                     progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
    report.warnings[:0] = warnings[: report.MAX_WARNINGS]
    if archive_missing_products:
        _archive_missing(report, settings)
    return report


def _archive_missing(report: UpsertReport, settings: Settings) -> None:
    hidden = [r for r in report.rejected if r.reason in SKU_UNKNOWN]
    if hidden:
        report.warn(f"nothing archived: {len(hidden)} rejected lines may name products (first: line "
                    f"{hidden[0].line}); fix them and import again")
        return
    if not report.seen_skus:
        raise ImportFileError("--archive-missing with a file that names no product would archive the whole "
                              "catalog; nothing archived")
    report.archived = archive_missing(report.seen_skus, settings=settings)


def _check_levels(settings: Settings, taxonomy: str | None, levels: list[str], name: str) -> None:
    """Label columns need a taxonomy that has their levels: checked before anything is written."""
    from catalog.db import session_scope
    from catalog.labels import read_taxonomy

    if taxonomy is None:
        raise ImportFileError(f"{name} has label columns ({', '.join('label:' + lv for lv in levels)}); "
                              "name their taxonomy with --taxonomy")
    with session_scope(settings.database_url) as session:
        tax = read_taxonomy(session, taxonomy)
    absent = [lv for lv in levels if lv not in tax.labels]
    if absent:
        raise ImportFileError(f"taxonomy {taxonomy!r} has no {absent[0]} labels (column label:{absent[0]}); "
                              "add them with 'styletag taxonomy apply'")


def write_rejections(path: str | Path, rejections: list[Rejection]) -> None:
    """Every rejected row as CSV (line, sku, reason, message), for the person fixing the file."""
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(["line", "sku", "reason", "message"])
    for r in rejections:
        out.writerow([r.line, r.sku or "", r.reason, r.message])
    Path(path).write_text(buf.getvalue(), encoding="utf-8")
