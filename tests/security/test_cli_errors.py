"""Issue 6, item 10: CLI and configuration errors, through real ``.venv/bin/styletag`` subprocesses.

A wrong database URL (bad scheme, missing driver, closed port, unknown host), an unreachable Redis, a
missing checkpoint and a checkpoint whose taxonomy has the catalog's name but other labels: each gives
exactly one line on stderr starting with ``error:``, a non-zero exit and no traceback anywhere.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import free_port
from tests.support.security import (
    BROKER_PASSWORD,
    DB_PASSWORD,
    assert_one_error_line,
    catalog_taxonomy,
    styletag,
    tiny_checkpoint,
)


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        ("foo://x/y", ("bad database URL 'foo://x/y'", "use postgresql+psycopg://")),
        (f"mysql://styletag:{DB_PASSWORD}@db.example/catalog", ("bad database URL", "driver is not installed")),
        ("postgresql+psycopg://styletag:{pw}@127.0.0.1:{port}/catalog", ("unavailable", "Connection refused")),
        ("postgresql+psycopg://styletag:{pw}@no-such-host.invalid/catalog", ("unavailable", "no-such-host.invalid")),
    ],
    ids=["bad-scheme", "missing-driver", "closed-port", "unknown-host"],
)
def test_wrong_database_url(sec, url, needles):
    url = url.format(pw=DB_PASSWORD, port=free_port())
    line = assert_one_error_line(styletag({**sec.env, "STYLETAG_DATABASE_URL": url}, "runs"), *needles)
    assert DB_PASSWORD not in line and ("***" in line or "@" not in url)


def test_unreachable_redis(sec, hostile_catalog):
    port = free_port()
    env = {**sec.env, "STYLETAG_BROKER_URL": f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port}/0"}
    line = assert_one_error_line(styletag(env, "retag", "--all"), "cannot reach the broker",
                                 f"redis://:***@127.0.0.1:{port}/0", "Connection refused")
    assert BROKER_PASSWORD not in line  # (styletag enqueue: test_secrets.py)


def test_missing_checkpoint(sec):
    proc = styletag({**sec.env, "STYLETAG_MODEL": "/nonexistent"}, "retag", "--all", "--inline")
    assert_one_error_line(proc, "model checkpoint /nonexistent not found", "STYLETAG_MODEL")


def test_checkpoint_with_other_labels_under_the_catalogs_taxonomy_name(sec, tmp_path):
    """Same taxonomy name, one fine label renamed: tagging through it would mislabel every product."""
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import StyleLabel

    tax = catalog_taxonomy()
    renamed = replace(tax, fine=replace(tax.fine, labels=(*tax.fine.labels[:-1], "renamed-" + tax.fine.labels[-1])))
    path = tmp_path / "other-labels.safetensors"
    tiny_checkpoint(path, renamed)
    with session_scope(sec.db.admin_url) as s:
        labels_before = s.scalar(select(func.count()).select_from(StyleLabel))
    proc = styletag({**sec.env, "STYLETAG_MODEL": str(path)}, "retag", "--all", "--inline")
    assert_one_error_line(proc, f"taxonomy {tax.name!r}", "renamed-" + tax.fine.labels[-1],
                          "use a new taxonomy name")
    with session_scope(sec.db.admin_url) as s:  # the new label was not left behind in the catalog
        assert s.scalar(select(func.count()).select_from(StyleLabel)) == labels_before


@pytest.mark.parametrize(("value", "needle"), [("-1", "STYLETAG_DECODE_THREADS must be 0 or more, got -1"),
                                               ("two", "STYLETAG_DECODE_THREADS must be an integer, got 'two'")])
def test_bad_decode_threads(sec, value, needle):
    assert_one_error_line(styletag({**sec.env, "STYLETAG_DECODE_THREADS": value}, "runs"), needle)


def test_decode_threads_caps_concurrent_decodes(monkeypatch):
    from types import SimpleNamespace

    from catalog.settings import Settings
    from worker.pipeline import Pipeline

    def decoders(value: str) -> int:
        monkeypatch.setenv("STYLETAG_DECODE_THREADS", value)
        ctx = SimpleNamespace(settings=Settings.from_env(), predictor=None, labels=None, reader=None, model_threads=1)
        return Pipeline(ctx)._decoders._value

    from catalog.settings import usable_cores

    assert decoders("3") == 3
    assert decoders("0") == usable_cores()
