import numpy as np
import pytest
import torch

from model import metrics as M
from model.evaluate import compute_metrics


def test_single_label_report_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    r = M.single_label_report(y, p, ["a", "b", "c"])
    assert r["top1"] == pytest.approx(4 / 6)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    pc = r["per_class"]
    assert pc["a"]["precision"] == pytest.approx(0.5) and pc["a"]["recall"] == pytest.approx(0.5)
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == pytest.approx(1.0)
    assert pc["c"]["precision"] == pytest.approx(1.0) and pc["c"]["recall"] == pytest.approx(0.5)
    f1 = [0.5, 0.8, 2 / 3]
    assert r["macro_f1"] == pytest.approx(np.mean(f1))


def test_consistency_rate_by_hand(fm_tax):
    # fine 7 (sneaker) -> shoes(5): ok; fine 6 (shirt) with coarse 5: wrong
    assert M.consistency(np.array([5, 5]), np.array([7, 6]), fm_tax.parents) == 0.5


def test_average_precision_by_hand():
    assert M.average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx((1 + 2 / 3) / 2)
    assert M.mean_average_precision(np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.1], [0.2, 0.8]])) == 1.0
    assert np.isnan(M.average_precision(np.array([0, 0]), np.array([0.3, 0.2])))


def test_micro_f1_by_hand():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    p = np.array([[1, 1, 0], [0, 1, 0]])
    # tp=2, fp=1, fn=1 -> 4/6
    assert M.micro_f1(y, p) == pytest.approx(2 / 3)


def test_compute_metrics_decodings(fm_tax):
    # row 0: correct; row 1: coarse head says shoes, fine head says shirt (true: shirt / tops)
    c = np.full((2, 6), -5.0, np.float32)
    f = np.full((2, 10), -5.0, np.float32)
    c[0, 5], f[0, 7] = 5, 5  # shoes / sneaker
    c[1, 0], c[1, 5], f[1, 6], f[1, 7] = 0, 2, 4, 0  # independent: (shoes, shirt) -> inconsistent
    logits = {"coarse_logits": c, "fine_logits": f, "coarse_t": np.array([5, 0]), "fine_t": np.array([7, 6])}
    ind = compute_metrics(fm_tax, logits, "independent")
    assert ind["consistency"] == 0.5 and ind["fine_top1"] == 1.0 and ind["coarse_top1"] == 0.5
    ours = compute_metrics(fm_tax, logits, "consistent")
    assert ours["consistency"] == 1.0
    assert ours["fine_top1"] == 1.0 and ours["coarse_top1"] == 1.0  # the fine evidence outweighs the coarse head
    flat = compute_metrics(fm_tax, logits, "fine-only")
    assert flat["consistency"] == 1.0 and flat["coarse_top1"] == 1.0


def test_compute_metrics_multilabel(ml_tax):
    ft = np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    ct = (ft @ np.array(ml_tax.parent_matrix(), np.float32)).clip(0, 1)
    logits = {"coarse_logits": np.where(ct > 0, 4.0, -4.0).astype(np.float32),
              "fine_logits": np.where(ft > 0, 4.0, -4.0).astype(np.float32), "coarse_t": ct, "fine_t": ft}
    m = compute_metrics(ml_tax, logits)
    assert m["fine_map"] == 1.0 and m["coarse_map"] == 1.0
    assert m["fine_micro_f1"] == 1.0 and m["consistency"] == 1.0
    assert torch.is_tensor(torch.from_numpy(logits["fine_logits"]))
