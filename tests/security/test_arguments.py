"""Issue 15, items 3 and 7: arguments nobody checked, through real ``styletag`` subprocesses.

Before: ``retag --chunk 0`` (or ``-5``) sent empty messages forever and left its run ``enqueuing``;
``--chunk 10001`` was accepted and every message then refused by the workers; ``runs 0`` listed every run;
``runs 99999999999999999999`` and a ``find --after`` cursor holding id 10^30 ended in "unexpected
OverflowError"; bytes that are not UTF-8 in argv in "unexpected UnicodeEncodeError"; ``--min-score nan``
was accepted; ``styletag tags`` with a 100,000-character SKU had not returned after 60 s (the error line
repeated the SKU whole, through a quadratic scrubber). Each is now a usage error or one ``error:`` line.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

EXE = Path(sys.executable).with_name("styletag")


def styletag(env: dict[str, str], *args: str | bytes, timeout: float = 60.0) -> subprocess.CompletedProcess:
    argv = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "worker.cli"]
    return subprocess.run([*argv, *args], env={**os.environ, **env}, capture_output=True, timeout=timeout)


def _err(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.decode("utf-8", "replace")


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """click's usage error: exit 2, 'Error: Invalid value ...' naming the parameter, no traceback."""
    err = _err(proc)
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and "unexpected" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def env(db_url, tmp_path) -> dict[str, str]:
    """A migrated catalog (SQLite or PostgreSQL) and a broker nobody listens on: a command that got past
    its arguments fails with 'cannot reach the broker' instead of hanging."""
    return {"STYLETAG_DATABASE_URL": db_url, "STYLETAG_HOME": str(tmp_path),
            "STYLETAG_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}


def _runs(url: str) -> list[tuple]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import TaggingRun

    with session_scope(url) as s:
        return s.execute(select(TaggingRun.id, TaggingRun.status)).all()


@pytest.mark.parametrize("chunk", ["0", "-5"])
def test_chunk_below_one_is_refused_before_a_run_exists(env, chunk):
    proc = styletag(env, "retag", "--all", "--chunk", chunk, timeout=30)
    assert_usage_error(proc, "'--chunk'", f"{chunk} is not in the range x>=1")
    assert _runs(env["STYLETAG_DATABASE_URL"]) == []


def test_chunk_over_the_workers_limit_is_refused(env):
    proc = styletag({**env, "STYLETAG_MAX_IDS_PER_TASK": "500"}, "retag", "--all", "--chunk", "501", timeout=30)
    assert_usage_error(proc, "'--chunk'", "501 is over STYLETAG_MAX_IDS_PER_TASK (500)")
    proc = styletag(env, "retag", "--all", "--chunk", "10001", timeout=30)
    assert_usage_error(proc, "10001 is over STYLETAG_MAX_IDS_PER_TASK (10000)")
    assert _runs(env["STYLETAG_DATABASE_URL"]) == []


@pytest.mark.parametrize("run_id", ["0", "-1", "99999999999999999999", str(2**63)])
def test_run_ids_outside_bigint_are_usage_errors(env, run_id):
    from catalog.db import session_scope
    from catalog.runs import create_run

    with session_scope(env["STYLETAG_DATABASE_URL"]) as s:
        create_run(s, kind="manual", scope="all", model_version="m")
    assert_usage_error(styletag(env, "runs", "--", run_id), "Invalid value for '[RUN_ID]'",
                       "1<=x<=9223372036854775807")
    assert_usage_error(styletag(env, "retag", "--resume", run_id), "'--resume'")


def test_runs_largest_bigint_is_not_found_not_an_overflow(env):
    proc = styletag(env, "runs", str(2**63 - 1))
    assert proc.returncode == 2 and _err(proc).startswith("error: no tagging run"), _err(proc)


def _cursor(score, pid) -> str:
    raw = json.dumps({"s": score, "p": pid}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("pid", [10**30, 2**63, 0, -3])
def test_cursor_with_an_id_outside_bigint_is_a_bad_cursor(env, pid):
    proc = styletag(env, "find", "--style", "sneaker", "--after", _cursor(0.5, pid))
    err = _err(proc)
    assert proc.returncode == 1 and err.startswith("error: bad cursor") and err.count("\n") == 1, err
    from catalog.db import session_scope
    from catalog.queries import BadCursor, find_by_style

    with session_scope(env["STYLETAG_DATABASE_URL"]) as s, pytest.raises(BadCursor):
        find_by_style(s, "sneaker", after=_cursor(0.5, pid))


@pytest.mark.parametrize("args", [("find", "--style", "x", "--min-score", "nan"), ("facets", "--min-score", "nan"),
                                  ("find", "--style", "x", "--min-score", "NaN")])
def test_min_score_nan_is_refused(env, args):
    assert_usage_error(styletag(env, *args), "'--min-score'", "is not a number between 0 and 1")


def test_min_score_nan_is_refused_by_the_python_api(sqlite_url):
    from catalog.db import session_scope
    from catalog.errors import StyletagError
    from catalog.queries import find_by_style

    with session_scope(sqlite_url) as s, pytest.raises(StyletagError, match="min_score must be a number"):
        find_by_style(s, "sneaker", min_score=float("nan"))


@pytest.mark.parametrize("args", [(b"tags", b"\xff\xfe"), (b"find", b"--style", b"caf\xe9"),
                                  (b"enqueue", b"ok", b"\x80")])
def test_argv_that_is_not_utf8_is_one_line(env, args):
    proc = styletag(env, *args)
    err = _err(proc)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: argument {len(args)} is not valid UTF-8 text"), err
    assert "unexpected" not in err and "Traceback" not in err


def test_a_100000_character_sku_is_answered_at_once_and_not_repeated_whole(env):
    sku = "S" * 100_000
    t0 = time.monotonic()
    proc = styletag(env, "tags", sku, timeout=30)
    elapsed = time.monotonic() - t0
    err = _err(proc)
    assert proc.returncode == 2 and err.startswith("error: no product with SKU 'SSSS"), err[:300]
    assert len(err) < 700, len(err)  # the SKU cut (to 80 characters; any error line to 600)
    assert elapsed < 20, elapsed
