"""The served scores' map (``model.calibration.fit_score_map``, metadata key ``score_map``) and ``styletag
calibrate``.

* On scores whose accuracy bends away from them (over-confident in the middle, under-confident below, right
  at the top: the shape the photo model's tempered scores had), no temperature can put every bin within
  5 points; the map fitted on one sample does so on a fresh sample of the same distribution.
* The map keeps what serving promises: scores in [0, 1], the primary label of every image unchanged, a
  coarse score never below a child's; the Predictor serves exactly ``model.calibration.served_scores``; a
  malformed map is refused at load in one line.
* ``styletag calibrate --from-catalog`` on a generated catalog: a new checkpoint with the same weights,
  temperatures and review thresholds, a score map, its parent recorded, another model_version; eval shows
  the tempered and calibrated ECE; a validation split too small for a map, and ``--out`` equal to
  ``--checkpoint``, are one-line errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from model import calibration as cal
from tests.support.cli import run_styletag
from tests.support.photo_model import photo_checkpoint


def _bent(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 scores in [0.1, 1) and whether each was right, where P(right | s) = s - 0.12 sin(pi (s - 0.1) /
    0.9) ... bent below the diagonal in the middle, on it at both ends (and a little above it near 0.1)."""
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.uniform(0.1, 0.9, n // 3), rng.beta(20, 1, n - n // 3) * 0.9 + 0.1])
    acc = np.clip(s - 0.12 * np.sin(np.pi * (s - 0.1) / 0.9), 0, 1)
    return s, rng.random(n) < acc


def _worst_gap(conf: np.ndarray, correct: np.ndarray, min_count: int = 100) -> float:
    table = cal.reliability_table(conf, correct, 10)
    return max(abs(r["accuracy"] - r["confidence"]) for r in table if r["count"] >= min_count)


def test_the_map_fitted_on_validation_calibrates_a_fresh_sample():
    val_s, val_ok = _bent(20_000, 0)
    test_s, test_ok = _bent(20_000, 1)
    assert _worst_gap(test_s, test_ok) > 0.08  # as served before: bins 8+ points off
    m = cal.fit_score_map(val_s, val_ok)
    assert len(m["x"]) <= cal.MAP_KNOTS and m["x"][0] == 0 and m["x"][-1] == 1
    mapped = cal.apply_map(test_s, m)
    assert _worst_gap(mapped, test_ok) <= 0.05  # measured 0.036 (sampling noise of ~800 per bin: +-1.7 points)
    assert cal.expected_calibration_error(mapped, test_ok) < cal.expected_calibration_error(test_s, test_ok) / 3
    cal.check_score_map({"fine": m, "coarse": m}, multi_label=False)  # what it writes, it accepts


def test_the_map_keeps_primaries_parents_and_the_unit_interval():
    rng = np.random.default_rng(3)
    parent = np.array([0, 1, 0, 2, 3, 2, 0, 3, 1, 3])
    coarse_logits, fine_logits = rng.normal(0, 3, (2000, 4)), rng.normal(0, 3, (2000, 10))
    fine = cal.joint_fine_probs(coarse_logits, fine_logits, parent)
    coarse = np.zeros((len(fine), 4))
    np.add.at(coarse.T, parent, fine.T)
    s, ok = _bent(5000, 2)
    smap = {"fine": cal.fit_score_map(s, ok), "coarse": cal.fit_score_map(s ** 0.5, ok)}
    c2, f2 = cal.map_scores(coarse.copy(), fine.copy(), parent, smap)
    assert (f2.argmax(1) == fine.argmax(1)).all()  # the primary label is the same
    assert ((0 <= f2) & (f2 <= 1)).all() and ((0 <= c2) & (c2 <= 1)).all()
    for j, p in enumerate(parent):
        assert (c2[:, p] >= f2[:, j]).all()  # a fine tag over its threshold brings its parent
    assert not np.allclose(f2, fine)  # it did change the scores


@pytest.mark.parametrize("bad", [
    {"fine": {"x": [0, 1], "y": [0.9, 0.1]}},  # no coarse map
    {"fine": {"x": [0, 1], "y": [0.9, 0.1]}, "coarse": {"x": [0, 1], "y": [0, 1]}},  # falling
    {"fine": {"x": [0, 0.5], "y": [0, 1]}, "coarse": {"x": [0, 1], "y": [0, 1]}},  # x does not reach 1
    {"fine": {"x": [0, 1], "y": [0, 2]}, "coarse": {"x": [0, 1], "y": [0, 1]}},  # outside [0, 1]
    {"fine": [0, 1], "coarse": {"x": [0, 1], "y": [0, 1]}},
])
def test_a_malformed_map_is_refused_at_load(tmp_path, bad):
    from model.checkpoint import CheckpointError
    from model.predictor import Predictor

    path = tmp_path / "m.safetensors"
    photo_checkpoint(path, score_map=bad)
    with pytest.raises(CheckpointError, match="metadata 'score_map'") as err:
        Predictor.from_checkpoint(path, device="cpu")
    assert "\n" not in str(err.value)


def test_the_predictor_serves_the_mapped_scores(tmp_path):
    import torch

    from model.predictor import Predictor

    s, ok = _bent(5000, 4)
    smap = {"fine": cal.fit_score_map(s, ok), "coarse": cal.fit_score_map(s ** 0.5, ok)}
    temps = {"coarse": 1.3, "fine": 0.8}
    plain, mapped = tmp_path / "plain.safetensors", tmp_path / "mapped.safetensors"
    v1 = photo_checkpoint(plain, temperature=temps, seed=7)
    v2 = photo_checkpoint(mapped, temperature=temps, score_map=smap, seed=7)
    assert v1 != v2  # the map is part of what a model predicts: another version
    images = np.random.default_rng(5).integers(0, 256, (64, 28, 28, 3), dtype=np.uint8)
    p1, p2 = (Predictor.from_checkpoint(p, device="cpu") for p in (plain, mapped))
    a1, a2 = p1.predict_arrays(images), p2.predict_arrays(images)
    assert (a1["primary_fine"] == a2["primary_fine"]).all() and (a1["primary_coarse"] == a2["primary_coarse"]).all()
    np.testing.assert_allclose(a2["fine_scores"], cal.apply_map(a1["fine_scores"], smap["fine"]), atol=1e-6)
    with torch.inference_mode():
        x = p2.input_tensor(images)
        cl, fl = (t.double().numpy() for t in p2.model(x))
    cs, fs = cal.served_scores(cl, fl, {**p2.meta, "taxonomy": p2.taxonomy.to_dict()})
    np.testing.assert_allclose(a2["fine_scores"], fs, atol=1e-4)  # numpy evaluation == what is served
    np.testing.assert_allclose(a2["coarse_scores"], cs, atol=1e-4)


# --------------------------------------------------------------------------- styletag calibrate


def test_calibrate_from_catalog_writes_a_new_checkpoint(sqlite_url, monkeypatch, capsys, tmp_path):
    from model.checkpoint import load_checkpoint
    from tests.model.test_catalog_training import TAXONOMY, write_catalog
    from worker.context import reset_context
    from worker.training import model_taxonomy

    store = tmp_path / "store"
    store.mkdir()
    for k, v in {"STYLETAG_HOME": str(tmp_path / "home"), "STYLETAG_STORE_URL": store.as_uri(),
                 "STYLETAG_ALLOWED_IMAGE_PREFIXES": store.as_uri() + "/", "STYLETAG_DEVICE": "cpu",
                 "STYLETAG_DATABASE_URL": sqlite_url}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("STYLETAG_MODEL", raising=False)
    reset_context()

    def styletag(*args: str, code: int = 0):
        proc = run_styletag(capsys, *args)
        assert proc.returncode == code, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc

    (tmp_path / "tax.json").write_text(json.dumps(TAXONOMY))
    styletag("db", "upgrade")
    styletag("taxonomy", "apply", str(tmp_path / "tax.json"))
    write_catalog(store, 720, tmp_path / "catalog.csv")
    styletag("import", "catalog", str(tmp_path / "catalog.csv"), "--taxonomy", "tiny-shop")

    from catalog.settings import Settings

    tax = model_taxonomy(Settings.from_env(), "tiny-shop")
    small, src, out = tmp_path / "small.safetensors", tmp_path / "src.safetensors", tmp_path / "cal.safetensors"
    review = {"temperature": {"coarse": 1.0, "fine": 1.0}, "review_score": {"kind": "msp"},
              "review_threshold": 0.4, "ood_threshold": 0.2}
    photo_checkpoint(small, taxonomy=tax, seed=1, data={"split": {"train": 80, "val": 10, "test": 10}}, **review)
    err = styletag("calibrate", "--from-catalog", "--checkpoint", str(small), "--out", str(out), "--procs", "1",
                   "--no-progress", code=1).stderr.strip()
    assert "a score map needs at least 500" in err and len(err.splitlines()) == 1, err
    assert not out.exists()

    version = photo_checkpoint(src, taxonomy=tax, seed=1, data={"split": {"train": 10, "val": 80, "test": 10}},
                               **review)
    proc = styletag("calibrate", "--from-catalog", "--checkpoint", str(src), "--out", str(src), code=2)
    assert "--out must differ from --checkpoint" in proc.stderr
    proc = styletag("calibrate", "--from-catalog", "--checkpoint", str(src), "--out", str(out), "--procs", "1",
                    "--no-progress")
    assert "score map fitted on" in proc.stdout
    old_state, old = load_checkpoint(src)
    new_state, new = load_checkpoint(out)
    assert set(old_state) == set(new_state) and all((old_state[k] == new_state[k]).all() for k in old_state)
    assert new["model_version"] != version and new["parent"]["model_version"] == version
    assert new["command"].startswith("styletag ")  # this process's command line (sys.argv, here pytest's)
    for key in ("temperature", "review_score", "review_threshold", "ood_threshold", "preprocess", "taxonomy"):
        assert new[key] == old[key], key
    fitted = new["metrics"]["score_map_fit"]
    assert fitted["split"] == "val" and fitted["n"] >= 500
    cal.check_score_map(new["score_map"], multi_label=False)

    ev = json.loads(styletag("eval", "--from-catalog", "--checkpoint", str(out), "--split", "val", "--outliers", "0",
                             "--no-colour", "--procs", "1", "--no-progress", "--json").stdout)
    c = ev["calibration"]
    assert {"fine_ece_raw", "fine_ece_tempered", "fine_ece_calibrated"} <= set(c)
    # what eval reports is the mapped scores (an untrained model's: no claim on their quality here; the
    # fresh-sample claim is the first test's, the photo model's figures are docs/results/fmnist-photo-eval.json)
    assert sum(r["count"] for r in c["reliability_fine"]) == ev["n"]
    assert 0 <= c["fine_ece_calibrated"] <= 1 and c["fine_ece_calibrated"] != c["fine_ece_tempered"]
    reset_context()
