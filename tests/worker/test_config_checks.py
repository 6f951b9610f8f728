"""Issue 15, item 6: a configuration that fails every product is one line before any work, and a run that
tagged nothing exits non-zero.

Before: ``STYLETAG_STORE_URL=file:///nonexistent styletag retag --all --inline`` printed "0 tagged, 269
failed ... (1129 images/s)", every product ``forbidden``, and exited 0; ``styletag worker`` started with
the same setting and refused every product it was given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from catalog.settings import Settings
from tests.conftest import free_port

EXE = Path(sys.executable).with_name("styletag")
N = 12


def styletag(env: dict[str, str], *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    argv = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "worker.cli"]
    return subprocess.run([*argv, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def catalog(sqlite_url, tmp_path) -> dict[str, str]:
    """N Fashion-MNIST products in a file store; the environment that reads them, and a closed broker."""
    from catalog.importers import import_fashion_mnist

    store = tmp_path / "images"
    import_fashion_mnist(sqlite_url, store.as_uri(), "test", limit=N, progress=False)
    return {"STYLETAG_DATABASE_URL": sqlite_url, "STYLETAG_HOME": str(tmp_path), "STYLETAG_STORE_URL": store.as_uri(),
            "STYLETAG_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "STYLETAG_TORCH_THREADS": "1"}


def _runs(url: str) -> int:
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import TaggingRun

    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(TaggingRun))


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "img/s" not in ln]  # less progress bars
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_store_url_that_holds_none_of_the_images_stops_retag_before_a_run(catalog):
    env = {**catalog, "STYLETAG_STORE_URL": "file:///nonexistent"}
    proc = styletag(env, "retag", "--all", "--inline")
    _one_error_line(proc, f"none of {N} sampled catalog images", "STYLETAG_ALLOWED_IMAGE_PREFIXES",
                    "file:///nonexistent/", "STYLETAG_STORE_URL")
    assert _runs(catalog["STYLETAG_DATABASE_URL"]) == 0  # no run created, nothing queued
    # The same with the prefixes set explicitly to somewhere else.
    proc = styletag({**catalog, "STYLETAG_ALLOWED_IMAGE_PREFIXES": "file:///srv/elsewhere/"}, "retag", "--all")
    _one_error_line(proc, "is under STYLETAG_ALLOWED_IMAGE_PREFIXES (file:///srv/elsewhere/)")
    assert _runs(catalog["STYLETAG_DATABASE_URL"]) == 0


def test_a_store_that_is_gone_stops_retag_before_a_run(catalog, tmp_path):
    (tmp_path / "images").rename(tmp_path / "moved")
    proc = styletag(catalog, "retag", "--all", "--inline")
    _one_error_line(proc, "sampled catalog images could be read (missing", "STYLETAG_STORE_URL")
    assert _runs(catalog["STYLETAG_DATABASE_URL"]) == 0


def test_worker_refuses_to_start_with_a_store_url_that_holds_none_of_the_images(catalog):
    env = {**catalog, "STYLETAG_STORE_URL": "file:///nonexistent"}
    argv = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "worker.cli"]
    proc = subprocess.Popen([*argv, "worker", "--gpus", "none", "--queues", "bulk"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("styletag worker started with a store that holds none of the catalog's images")
    _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                    "STYLETAG_ALLOWED_IMAGE_PREFIXES", "file:///nonexistent/")
    assert "celery" not in err.lower()  # no Celery process was started


def test_a_run_that_tagged_nothing_exits_non_zero(catalog, tmp_path):
    """Readable images that are all broken: the check passes (it reads, it does not decode), the run fails
    every product, and retag says so with a non-zero exit."""
    for f in (tmp_path / "images").rglob("*.png"):
        f.write_bytes(b"<html>502 Bad Gateway</html>")
    proc = styletag(catalog, "retag", "--all", "--inline")
    line = _one_error_line(proc, "tagged nothing", f"all {N} products failed", "styletag report")
    assert line.startswith("error: run 1 tagged nothing")
    assert f"0 tagged, {N} failed" in proc.stdout


def test_a_database_that_does_not_answer_is_a_warning_not_a_configuration_error(catalog):
    from worker.ops.preflight import check_image_access

    closed = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    settings = replace(Settings.from_env(), database_url=closed, store_url=catalog["STYLETAG_STORE_URL"],
                       allowed_image_prefixes=(catalog["STYLETAG_STORE_URL"] + "/",))
    warnings = check_image_access(settings)
    assert len(warnings) == 1 and warnings[0].startswith("catalog not checked (database unavailable"), warnings
    # and a healthy configuration passes silently
    ok = replace(settings, database_url=catalog["STYLETAG_DATABASE_URL"])
    assert check_image_access(ok) == []


def test_an_empty_catalog_is_not_a_configuration_error(sqlite_url):
    from worker.ops.preflight import check_image_access

    settings = replace(Settings.from_env(), database_url=sqlite_url, store_url="file:///nonexistent",
                       allowed_image_prefixes=("file:///nonexistent/",))
    assert check_image_access(settings) == []
