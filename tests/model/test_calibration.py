"""model.calibration: temperature scaling, ECE and the review threshold."""

import numpy as np
import pytest
import torch

from model.calibration import (
    auroc,
    expected_calibration_error,
    fit_review_threshold,
    fit_temperature,
    flag_rate,
    nll,
    reliability_table,
    review_report,
    review_scores,
    softmax,
)
from model.consistency import decode_single


def _calibrated(n=4000, k=10, seed=0):
    """Logits whose softmax is the true class distribution, and targets drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, k))
    p = softmax(logits)
    targets = np.array([rng.choice(k, p=row) for row in p])
    return logits, targets


def test_temperature_undoes_overconfidence_and_lowers_nll():
    logits, targets = _calibrated()
    over = 3.0 * logits  # an overconfident network
    t = fit_temperature(over, targets)
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(over, targets, t) < nll(over, targets) - 0.1
    conf = softmax(over).max(1)
    correct = softmax(over).argmax(1) == targets
    ece_before = expected_calibration_error(conf, correct)
    ece_after = expected_calibration_error(softmax(over, t).max(1), correct)
    assert ece_after < 0.03 < ece_before


def test_reliability_table_counts_and_a_perfect_model():
    logits, targets = _calibrated(seed=1)
    p = softmax(logits)
    table = reliability_table(p.max(1), p.argmax(1) == targets, n_bins=10)
    assert len(table) == 10 and sum(r["count"] for r in table) == len(targets)
    for r in table:
        if r["count"] >= 200:
            assert abs(r["accuracy"] - r["confidence"]) < 0.06, r
    assert expected_calibration_error(np.array([0.9] * 10), np.array([1] * 9 + [0])) == pytest.approx(0.0)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_threshold_hits_the_requested_flag_rate(rate):
    rng = np.random.default_rng(2)
    garments = rng.normal(2.0, 1.0, 5000)
    thr = fit_review_threshold(garments, rate)
    assert rate - 0.002 <= flag_rate(garments, thr) <= rate
    fresh = rng.normal(2.0, 1.0, 20000)  # the same distribution, unseen
    assert flag_rate(fresh, thr) == pytest.approx(rate, abs=0.01 + rate * 0.1)
    ties = np.repeat([0.1, 0.5, 0.9], [10, 500, 490])  # heavy ties never push the rate over
    assert flag_rate(ties, fit_review_threshold(ties, 0.05)) <= 0.05


def test_scores_and_report():
    rng = np.random.default_rng(3)
    coarse, fine = rng.normal(0, 3, (50, 6)), rng.normal(0, 3, (50, 10))
    parent = np.array([0, 1, 0, 2, 3, 5, 0, 5, 4, 5])
    msp = review_scores(fine, "msp", coarse_logits=coarse, parent=parent)
    _, fine_scores, _, _ = decode_single(torch.tensor(coarse), torch.tensor(fine), torch.tensor(parent))
    assert np.allclose(msp, fine_scores.max(1).values.numpy(), atol=1e-6)
    energy = review_scores(fine, "energy")
    assert np.allclose(energy, np.log(np.exp(fine).sum(1)))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.ones(5), np.ones(7)) == 0.5
    garments, outliers = rng.normal(3, 1, 2000), rng.normal(-1, 1, 2000)
    rep = review_report(garments, outliers, fit_review_threshold(garments, 0.05))
    assert rep["garments_flagged"] <= 0.05 and rep["outliers_flagged"] > 0.95 and rep["auroc"] > 0.99
    with pytest.raises(ValueError):
        review_scores(fine, "vibes")
