"""The catalog's commands (``db``, ``import``, ``tags``, ``find``, ``facets``), mounted on the ``styletag``
group by ``worker.cli`` (which turns a StyletagError into ``error: <message>`` and its exit code). None of
them imports torch, so the storefront commands start fast. ``--json`` prints JSON and nothing else on stdout.

This module holds what they share: settings and output helpers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from catalog.settings import Settings


def current_settings() -> Settings:
    return Settings.from_env()


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """A small aligned table for humans: numbers right-aligned, text left-aligned."""
    cells = [list(headers)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows)
        for i in range(len(headers))
    ]
    return "\n".join(
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)).rstrip()
        for r in cells
    )
