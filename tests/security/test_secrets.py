"""Issue 6, item 12: credentials never appear in logs, error messages or ``styletag runs`` output.

Every styletag process of this package ran with a PostgreSQL URL holding a password (a real login role,
over 127.0.0.1), a Redis URL holding a password (a private redis-server that requires it) and
AWS_SECRET_ACCESS_KEY set (the worker read S3 objects with it). This module adds the remaining outputs
(runs, DEBUG logs, error messages of unreachable services) and then greps everything: every captured
stdout and stderr, the worker's whole log, and the text the catalog stores (tag_state errors).
Runs last in the package (file order), so the greps cover every command the package ran.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from catalog.db import session_scope
from catalog.schema import TaggingRun, TagState
from tests.conftest import free_port
from tests.support.security import (
    AWS_SECRET,
    BROKER_PASSWORD,
    CAPTURED,
    DB_PASSWORD,
    assert_one_error_line,
    secret_forms,
    styletag,
)


def test_runs_output_and_error_messages_carry_no_secret(sec, hostile_catalog):
    runs = styletag(sec.env, "runs")
    assert runs.returncode == 0 and f"run {hostile_catalog.celery_run['id']:>5}" in runs.stdout, runs.stderr
    as_json = styletag(sec.env, "--log-level", "DEBUG", "runs", "--json")
    assert as_json.returncode == 0 and len(json.loads(as_json.stdout)) >= 2

    closed_db = sec.db.url.replace(":5432/", f":{free_port()}/")
    assert DB_PASSWORD in closed_db
    debug = styletag({**sec.env, "STYLETAG_DATABASE_URL": closed_db}, "--log-level", "DEBUG", "runs")
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # DEBUG logs the traceback (scrubbed)
    line = debug.stderr.strip().splitlines()[-1]
    assert line.startswith("error: database ") and f"{sec.db.role}:***@127.0.0.1" in line, line
    closed_broker = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{free_port()}/13"
    line = assert_one_error_line(styletag({**sec.env, "STYLETAG_BROKER_URL": closed_broker}, "enqueue",
                                          "s3/photo.png"), "cannot reach the broker")
    assert "redis://:***@127.0.0.1" in line

    assert len(CAPTURED) >= 6  # with hostile_catalog's two retags; in a package run, every command of it
    for command, text in CAPTURED:
        for secret in secret_forms():
            assert secret not in text, (command, secret)


def test_worker_log_and_catalog_carry_no_secret(sec, sec_worker, hostile_catalog):
    # The worker really ran with the secrets (its environment) and really used them (S3 images tagged).
    environ = Path(f"/proc/{sec_worker.proc.pid}/environ").read_bytes().split(b"\0")
    assert f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}".encode() in environ
    assert f"STYLETAG_DATABASE_URL={sec.db.url}".encode() in environ and DB_PASSWORD in sec.db.url
    assert hostile_catalog.celery_states["s3/photo.png"][:2] == ("tagged", None)
    log = sec_worker.text()
    assert "tag_products run=" in log and "Connected to redis://" in log
    for secret in secret_forms():
        assert secret not in log, secret
    with session_scope(sec.db.admin_url) as s:
        stored = [e for e in s.scalars(select(TagState.error)) if e]
        runs = [json.dumps([r.kind, r.scope, r.model_version, r.status]) for r in s.scalars(select(TaggingRun))]
    assert len(stored) >= 40  # the failures of the hostile catalog, with their messages
    for text in stored + runs:
        for secret in secret_forms():
            assert secret not in text, (secret, text)
