"""Which taxonomy a deployment serves (``worker.context.served_taxonomy``).

A newcomer's path: no ``STYLETAG_MODEL``; the first command bootstraps the registry with the shipped
Fashion-MNIST checkpoint; the shop then registers a model of its own taxonomy with ``--activate``. From that
moment retags and uploads are served that model (before this rule they kept the Fashion-MNIST one and tagged
the shop's catalog with Fashion-MNIST labels). ``STYLETAG_MODEL`` still decides when it is set, and models of
two taxonomies activated with no ``STYLETAG_MODEL`` is a one-line error, not a silent pick.
"""

from __future__ import annotations

import json

import pytest

from model.taxonomy import Taxonomy
from tests.support.cli import run_styletag
from tests.support.photo_model import photo_checkpoint


def _taxonomy(name: str) -> Taxonomy:
    return Taxonomy.from_dict({"name": name, "levels": {
        "coarse": {"multi_label": False, "labels": ["tops", "shoes"]},
        "fine": {"multi_label": False, "labels": [{"name": "tshirt", "parents": ["tops"]},
                                                  {"name": "boot", "parents": ["shoes"]}]}}})


@pytest.fixture
def env(monkeypatch, tmp_path, sqlite_url):
    from worker.context import reset_context

    monkeypatch.setenv("STYLETAG_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STYLETAG_DEVICE", "cpu")
    monkeypatch.delenv("STYLETAG_MODEL", raising=False)
    reset_context()
    yield tmp_path
    reset_context()


def _settings():
    from catalog.settings import Settings

    return Settings.from_env()


def _cli(capsys, *args: str):
    proc = run_styletag(capsys, *args)
    assert proc.returncode == 0, (args, proc.stdout[-1500:], proc.stderr[-1500:])
    return proc.stdout


def test_a_shops_activated_taxonomy_is_served_without_styletag_model(env, capsys, monkeypatch):
    from model.metadata import CheckpointMeta
    from model.weights import DEFAULT_CHECKPOINT
    from worker.context import get_context, preflight, reset_context
    from worker.producers.retag import current_model_version

    default_version = CheckpointMeta.read(DEFAULT_CHECKPOINT).model_version
    # an empty registry serves (and bootstraps) the shipped Fashion-MNIST checkpoint
    assert current_model_version(_settings()) == default_version
    assert get_context(_settings()).taxonomy == "fashion-mnist"

    shop = env / "shop.safetensors"
    shop_version = photo_checkpoint(shop, taxonomy=_taxonomy("my-shop"), seed=1)
    reg = json.loads(_cli(capsys, "model", "register", str(shop), "--activate", "--json"))
    assert reg["version"] == shop_version and reg["status"] == "active"

    # the retag producer, a running worker's context (no restart) and the preflight all follow it
    assert current_model_version(_settings()) == shop_version
    ctx = get_context(_settings())
    assert ctx.taxonomy == "my-shop" and ctx.active_version() == shop_version
    assert shop_version in preflight(_settings())

    # STYLETAG_MODEL still names the served taxonomy when it is set
    monkeypatch.setenv("STYLETAG_MODEL", str(DEFAULT_CHECKPOINT))
    reset_context()
    assert current_model_version(_settings()) == default_version
    assert get_context(_settings()).active_version() == default_version


def test_two_activated_taxonomies_without_styletag_model_is_a_one_line_error(env, capsys, monkeypatch):
    from model.weights import DEFAULT_CHECKPOINT
    from worker.context import SeveralTaxonomies, ensure_serving
    from worker.producers.retag import current_model_version

    versions = {}
    for name in ("shop-a", "shop-b"):
        path = env / f"{name}.safetensors"
        versions[name] = photo_checkpoint(path, taxonomy=_taxonomy(name), seed=len(versions))
        _cli(capsys, "model", "register", str(path), "--activate")  # the second is accepted: activating sorts it out

    with pytest.raises(SeveralTaxonomies, match=r"several taxonomies are active \(shop-a, shop-b\); set STYLETAG_MODEL"):
        current_model_version(_settings())
    proc = run_styletag(capsys, "retag", "--all", "--inline")
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "several taxonomies are active" in err[0] and "Traceback" not in proc.stderr, proc.stderr

    # naming one of them settles it; the Fashion-MNIST bootstrap (never activated by a person) never counts
    path_b = env / "shop-b.safetensors"
    monkeypatch.setenv("STYLETAG_MODEL", str(path_b))
    assert ensure_serving(_settings()).version == versions["shop-b"]
    monkeypatch.setenv("STYLETAG_MODEL", str(DEFAULT_CHECKPOINT))
    assert ensure_serving(_settings()).taxonomy == "fashion-mnist"


def test_a_retag_that_would_tag_a_shops_catalog_with_another_taxonomy_says_so(env, capsys, tmp_path, monkeypatch):
    """A shop's catalog (truth labels of its own taxonomy only) retagged before its model is activated: the
    run goes ahead with the Fashion-MNIST bootstrap (what was asked), with one warning line naming the fix;
    once the shop's model is active, no warning."""
    from PIL import Image

    from catalog.db import session_scope
    from catalog.labels import other_labelled_taxonomy

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("STYLETAG_STORE_URL", store.as_uri())
    monkeypatch.setenv("STYLETAG_ALLOWED_IMAGE_PREFIXES", store.as_uri() + "/")
    tax = _taxonomy("my-shop")
    (tmp_path / "tax.json").write_text(json.dumps(tax.to_dict()))
    _cli(capsys, "taxonomy", "apply", str(tmp_path / "tax.json"))
    rows = ["sku,image_uri,label:coarse,label:fine"]
    for i, (coarse, fine) in enumerate([("tops", "tshirt"), ("shoes", "boot"), ("tops", "tshirt")]):
        Image.new("RGB", (120, 160), (240, 240, 240)).save(store / f"p{i}.png")
        rows.append(f"p{i},{(store / f'p{i}.png').as_uri()},{coarse},{fine}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    _cli(capsys, "import", "catalog", str(tmp_path / "c.csv"), "--taxonomy", "my-shop")

    proc = run_styletag(capsys, "retag", "--all", "--inline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr
    assert "taxonomy 'my-shop', this run's model serves 'fashion-mnist'" in warnings[0]
    assert "styletag train --from-catalog --taxonomy my-shop" in warnings[0]

    shop = tmp_path / "shop.safetensors"
    photo_checkpoint(shop, taxonomy=tax, seed=2)
    _cli(capsys, "model", "register", str(shop), "--activate")
    proc = run_styletag(capsys, "retag", "--all", "--inline")
    assert proc.returncode == 0 and "warning:" not in proc.stderr, proc.stderr[-2000:]
    with session_scope(_settings().database_url) as session:
        assert other_labelled_taxonomy(session, "my-shop") is None
        assert other_labelled_taxonomy(session, "fashion-mnist") == "my-shop"
        assert other_labelled_taxonomy(session, "nobody-has-it") == "my-shop"


def test_no_warning_on_a_catalog_without_truth_labels(env):
    from catalog.db import session_scope
    from catalog.labels import other_labelled_taxonomy

    with session_scope(_settings().database_url) as session:
        assert other_labelled_taxonomy(session, "fashion-mnist") is None
