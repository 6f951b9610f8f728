"""``styletag browse`` and ``styletag facets --within`` through the real entry point: JSON on stdout only,
the same answers as catalog.browse, the browse score explained in --help, one error line for bad input."""

from __future__ import annotations

import json
import random

import pytest

from catalog.browse import browse, facets_within
from catalog.db import read_connection, session_scope
from catalog.facets import resync_tag_sets
from tests.catalog import browse_helpers as bf
from tests.support.cli import run_styletag


@pytest.fixture
def shop(sqlite_url, seed, monkeypatch, tmp_path):
    cat = seed(sqlite_url, 80)
    with session_scope(sqlite_url) as s:
        bf.add_colours(s)
        bf.random_tags(s, cat.ids, random.Random(3), published_share=1.0)
        resync_tag_sets(s, cat.ids)
    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path / "home"))
    return cat


@pytest.fixture
def styletag(capsys):
    def run(*args: str) -> tuple[int, str, str]:
        done = run_styletag(capsys, *args)
        return done.returncode, done.stdout, done.stderr

    return run


def test_browse_and_facets_within_print_what_the_api_answers(shop, styletag):
    with read_connection(shop.url) as conn:
        want = browse(conn, ["tops", "navy"], limit=1)
        want_next = browse(conn, ["tops", "navy"], limit=1, after=want["next_cursor"])
        want_facets = facets_within(conn, ["tops"])
        want_all = browse(conn, [], limit=5)
    assert want["products"] > 1  # the pages below are real pages
    code, out, err = styletag("browse", "--style", "tops", "--style", "navy", "--limit", "1", "--json")
    assert code == 0 and err == "" and json.loads(out) == want
    code, out, _ = styletag("browse", "--style", "tops", "--style", "navy", "--limit", "1", "--after",
                            want["next_cursor"], "--json")
    assert json.loads(out) == want_next
    code, out, _ = styletag("facets", "--within", "tops", "--json")
    assert code == 0 and json.loads(out) == want_facets
    code, out, _ = styletag("browse", "--json", "--limit", "5")
    assert json.loads(out) == want_all and set(want_all["facets"]) == {"coarse", "fine", "colour"}

    code, out, _ = styletag("browse", "--style", "tops", "--style", "navy", "--limit", "1")
    assert code == 0 and out.startswith(f"{want['products']} products show tops + navy")
    assert all(i["sku"] in out for i in want["items"]) and f"--after {want['next_cursor']}" in out
    code, out, _ = styletag("facets", "--within", "tops", "--level", "colour")
    assert code == 0 and "colour" in out and " fine " not in out


def test_browse_help_explains_the_score(styletag):
    code, out, _ = styletag("browse", "--help")
    assert code == 0 and "mean score of all its published tags" in " ".join(out.split())


def test_bad_input_is_one_error_line(shop, styletag):
    for args, code in ((("browse", "--style", "nope"), 2), (("facets", "--within", "nope"), 2),
                       (("browse", "--after", "garbage!", "--style", "tops"), 1),
                       (("browse", "--min-score", "nan"), 2), (("facets", "--within", "tops", "--all-tags"), 2)):
        got, out, err = styletag(*args)
        assert got == code, (args, got, err)
        assert out == "" and len(err.strip().splitlines()) >= 1 and "Traceback" not in err
