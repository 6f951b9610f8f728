"""Issue 6, item 8: hostile catalog rows.

Image URIs outside the allowed prefixes, ``..`` in every encoding, symlinks out of the store, other
schemes (cloud metadata, loopback http/https/gopher/ftp, data:), control characters, absurd lengths: each
is refused with reason ``forbidden`` and a message that says why, inline and through the worker, and
nothing outside the allowed prefixes is ever opened (inotify) or connected to (a loopback trap).
SKUs with SQL metacharacters and unicode are tagged and found by ``styletag tags`` / catalog.queries.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import DataError

from catalog.db import session_scope
from catalog.errors import ForbiddenURI
from catalog.schema import Product
from catalog.storage import ImageReader
from tests.support.security import HOSTILE_SKUS, assert_one_error_line, styletag

WHY = {  # what tag_state.error says, per hostile URI
    "uri/etc-passwd": "outside the allowed prefixes",
    "uri/outside-absolute": "outside the allowed prefixes",
    "uri/dotdot": "'..' path segment",
    "uri/dotdot-encoded": "'..' path segment",
    "uri/dotdot-encoded-upper": "'..' path segment",
    "uri/dotdot-double-encoded": "'..' path segment",
    "uri/dotdot-encoded-slash": "'..' path segment",
    "uri/dotdot-backslash": "'..' path segment",
    "uri/symlink-to-file-outside": "resolves (through a symlink) outside the allowed prefixes",
    "uri/symlink-to-dir-outside": "resolves (through a symlink) outside the allowed prefixes",
    "uri/prefix-sibling": "outside the allowed prefixes",
    "uri/file-with-host": "file URI with a host is not allowed",
    "uri/fifo-in-store": "not a regular file",
    "uri/directory-in-store": "not a regular file",
    "uri/cloud-metadata": "scheme 'http' not allowed",
    "uri/http-loopback": "scheme 'http' not allowed",
    "uri/https-loopback": "scheme 'https' not allowed",
    "uri/gopher-loopback": "scheme 'gopher' not allowed",
    "uri/ftp-loopback": "scheme 'ftp' not allowed",
    "uri/data-uri": "scheme 'data' not allowed",
    "uri/no-scheme": "scheme '(none)' not allowed",
    "uri/empty": "empty image URI",
    "uri/nul-byte": "NUL byte",
    "uri/query-string": "query or fragment not allowed",
    "uri/header-injection": "control character",
    "uri/long-2048": "File name too long",
    "s3/outside-key-prefix": "outside the allowed prefixes",
    "s3/dotdot": "'..' path segment",
    "s3/dotdot-encoded": "'..' path segment",
    "s3/other-bucket": "outside the allowed prefixes",
    "s3/userinfo": "bad bucket",
}


@pytest.mark.parametrize("path", ["inline", "celery"])
def test_hostile_uris_are_refused_with_their_reason(hostile_catalog, path):
    got = hostile_catalog.inline_states if path == "inline" else hostile_catalog.celery_states
    hostile = {sku for sku, row in hostile_catalog.rows.items() if row.expect == ("failed", "forbidden")}
    assert hostile == set(WHY) and len(hostile) == 31
    for sku in sorted(hostile):
        status, reason, error, _run = got[sku]
        assert (status, reason) == ("failed", "forbidden"), (sku, status, reason, error)
        assert WHY[sku] in error, (sku, error)
        assert "\n" not in error and len(error) <= 500


def test_nothing_outside_the_prefixes_was_read(hostile_catalog, sec):
    """No open or read of any file in outside/ or store-evil/ during both runs (inotify, every process),
    and no connection to the loopback trap that the http/https/gopher/ftp URIs point at. Then the
    positive controls: our own read and connection are seen, so the watchers were working."""
    assert hostile_catalog.reads_outside == []
    assert hostile_catalog.trap.connections == 0
    assert (sec.outside / "secret.png").read_bytes()[:4] == b"\x89PNG"
    with socket.create_connection(("127.0.0.1", hostile_catalog.trap.port), timeout=5) as conn:
        conn.recv(16)
    deadline = time.monotonic() + 5
    events: list[str] = []
    while time.monotonic() < deadline and not (events and hostile_catalog.trap.connections):
        events += hostile_catalog.watch.events()
        time.sleep(0.05)
    assert any(e.endswith("secret.png open") for e in events), events
    assert hostile_catalog.trap.connections == 1


def test_reader_refuses_absurd_uri_quickly(sec):
    reader = ImageReader((sec.store_uri + "/",), 1000)
    for uri in (sec.store_uri + "/" + "a" * 100_000, "file:///" + "../" * 40_000, "s3://" + "b" * 100_000 + "/k"):
        t0 = time.perf_counter()
        with pytest.raises(ForbiddenURI, match=r"longer than 2048 characters \(\d+\)"):
            reader.get(uri)
        assert time.perf_counter() - t0 < 1.0  # refused on its length, not after parsing 100 kB (generous)


def test_100kb_uri_never_stored_on_postgres(sec):
    """products.image_uri is VARCHAR(2048): PostgreSQL refuses a 100 kB URI outright."""
    with pytest.raises(DataError, match="value too long"), session_scope(sec.db.admin_url) as s:
        s.add(Product(sku="uri/100kb", title="", image_uri=sec.store_uri + "/" + "a" * 100_000, image_version="v1"))
        s.flush()
    with session_scope(sec.db.admin_url) as s:
        assert s.scalar(select(func.count()).select_from(Product).where(Product.sku == "uri/100kb")) == 0


def test_100kb_uri_refused_by_the_pipeline_on_sqlite(sec, sqlite_url, hostile_catalog):
    """SQLite does not enforce VARCHAR lengths, so there the 100 kB URI reaches the pipeline: refused
    as forbidden, and the good product of the same batch is tagged (inline, real model)."""
    from catalog.schema import TagState
    from worker.context import reset_context
    from worker.producers.retag import run_inline, start_run

    with session_scope(sqlite_url) as s:
        s.add(Product(sku="long", title="", image_uri=sec.store_uri + "/" + "a" * 100_000, image_version="v1"))
        s.add(Product(sku="good", title="", image_uri=f"{sec.store_uri}/img/one_pixel.png", image_version="v1"))
    settings = sec.settings(database_url=sqlite_url)
    reset_context()
    try:
        report = run_inline(settings, start_run(settings, scope="all"), progress=False)
    finally:
        reset_context()
    assert (report.tagged, report.failed) == (1, 1)
    with session_scope(sqlite_url) as s:
        got = dict(s.execute(select(Product.sku, TagState.reason).join(TagState, TagState.product_id == Product.id)).all())
        error = s.scalar(select(TagState.error).join(Product, Product.id == TagState.product_id).where(Product.sku == "long"))
    assert got == {"long": "forbidden", "good": None}
    assert "longer than 2048 characters (100" in error and len(error) <= 500


def test_hostile_skus_are_tagged_and_queryable(hostile_catalog, sec):
    from catalog.queries import find_by_style, tags_for_sku

    for sku in HOSTILE_SKUS:
        assert hostile_catalog.inline_states[sku][:2] == ("tagged", None)
        assert hostile_catalog.celery_states[sku][:2] == ("tagged", None)
    with session_scope(sec.db.admin_url) as s:
        assert s.scalar(select(func.count()).select_from(Product)) >= len(hostile_catalog.rows)  # table intact
        for sku in HOSTILE_SKUS:
            data = tags_for_sku(s, sku)
            assert data["sku"] == sku and len(data["tags"]) >= 2
            primary_fine = next(t["style"] for t in data["tags"] if t["is_primary"] and t["level"] == "fine")
            items, _ = find_by_style(s, primary_fine, level="fine", limit=1000)
            assert sku in {i["sku"] for i in items}
    for sku in (HOSTILE_SKUS[0], HOSTILE_SKUS[2], HOSTILE_SKUS[3]):  # the CLI, as a shell passes it: SQL, emoji, RTL
        proc = styletag(sec.env, "tags", sku, "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["sku"] == sku and {t["level"] for t in data["tags"]} == {"coarse", "fine"}


def test_sku_lookup_is_exact_never_a_pattern(hostile_catalog, sec):
    from catalog.errors import NotFound
    from catalog.queries import tags_for_sku

    with session_scope(sec.db.admin_url) as s:
        for pattern in ("%", "sku%", "_%", "sku%_\\*[a-z]%", "*", "' OR '1'='1", "'; DROP TABLE products; -- "):
            with pytest.raises(NotFound):
                tags_for_sku(s, pattern)
    proc = styletag(sec.env, "tags", "%")
    assert proc.returncode == 2
    assert_one_error_line(proc, "no product with SKU '%'")
