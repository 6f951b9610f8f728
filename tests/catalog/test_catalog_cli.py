"""The catalog's CLI commands, through the real ``styletag`` entry point: JSON on stdout only, one
error line and exit code 2 for an unknown SKU or style."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model.fmnist import DEFAULT_SOURCE
from tests.support.cli import run_styletag

HAVE_FMNIST = any((DEFAULT_SOURCE / f"t10k-labels-idx1-ubyte{ext}").is_file() for ext in ("", ".gz"))


def subprocess_styletag(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(tmp_path, monkeypatch):
    env = {"STYLETAG_HOME": str(tmp_path / "home"), "STYLETAG_DATABASE_URL": f"sqlite:///{tmp_path / 'cat.db'}",
           "STYLETAG_STORE_URL": (tmp_path / "images").as_uri()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def styletag(capsys):
    """Run the real entry point (worker.cli.main) in this process: fast, same code path as the console
    script. Returns (exit code, stdout, stderr)."""
    def run(env: dict, *args: str) -> subprocess.CompletedProcess:
        return run_styletag(capsys, *args)

    return run


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")
def test_upgrade_import_find_tags(env, styletag):
    up = styletag(env, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert styletag(env, "db", "current").stdout.strip() == "0003"
    imp = styletag(env, "import", "fashion-mnist", "--split", "test", "--limit", "30", "--json")
    assert imp.returncode == 0, imp.stderr
    assert json.loads(imp.stdout)["inserted"] == 30
    found = styletag(env, "find", "--style", "sneaker", "--json")
    assert found.returncode == 0 and json.loads(found.stdout) == {"items": [], "next_cursor": None}
    tags = styletag(env, "tags", "fmnist-test-00000", "--json")
    assert tags.returncode == 0
    assert json.loads(tags.stdout) == {
        "sku": "fmnist-test-00000", "title": "Fashion-MNIST ankle boot #0",
        "image_uri": env["STYLETAG_STORE_URL"] + "/fmnist/test/00000.png", "tags": []}
    human = styletag(env, "facets", "--level", "coarse")
    assert human.returncode == 0 and "shoes" in human.stdout and "taxonomy" in human.stdout
    facets = json.loads(styletag(env, "facets", "--json").stdout)
    assert len(facets) == 16 and all(f["count"] == 0 for f in facets)

    missing = subprocess_styletag(env, "tags", "fmnist-test-99999")  # the console script's exit code
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == "error: no product with SKU 'fmnist-test-99999'"
    unknown = styletag(env, "find", "--style", "spacesuit", "--json")
    assert unknown.returncode == 2 and unknown.stdout == "" and unknown.stderr.startswith("error: no style")
    bad = styletag(env, "find", "--style", "sneaker", "--after", "nonsense")
    assert bad.returncode == 1 and bad.stderr.startswith("error: bad cursor")

    down = styletag(env, "db", "downgrade")
    assert down.returncode == 0 and styletag(env, "db", "current").stdout.strip() == "base"


def test_missing_dataset_is_one_line(env, tmp_path, styletag):
    assert styletag(env, "db", "upgrade").returncode == 0
    out = styletag(env, "import", "fashion-mnist", "--source", str(tmp_path / "none"), "--limit", "5")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: ") and "dataset-fashion-mnist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_commands_work_in_process():
    """The command objects are importable without torch and mount on any click group."""
    import click
    from click.testing import CliRunner

    from catalog.cli.db import db
    from catalog.cli.intake import import_cmd
    from catalog.cli.storefront import facets, find, tags

    group = click.Group(commands=[db, import_cmd, tags, find, facets])
    assert import_cmd.name == "import" and "fashion-mnist" in import_cmd.commands
    result = CliRunner().invoke(group, ["find", "--help"])
    assert result.exit_code == 0 and "--min-score" in result.output
    code = "import sys, catalog.cli.db, catalog.cli.intake, catalog.cli.storefront, catalog.queries, catalog.storage, catalog.importers, catalog.tags; " \
           "sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
