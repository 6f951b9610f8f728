"""Classification metrics on numpy arrays (no sklearn): accuracy, macro-F1, per-class precision/recall,
confusion matrices, hierarchy consistency, and multi-label mAP / micro-F1."""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """cm[t, p] = count of true t predicted p."""
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1) per class; 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(0).astype(np.float64)
    true = cm.sum(1).astype(np.float64)
    prec = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    rec = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    denom = prec + rec
    f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(tp), where=denom > 0)
    return prec, rec, f1


def single_label_report(y_true: np.ndarray, y_pred: np.ndarray, names: tuple[str, ...] | list[str]) -> dict:
    n = len(names)
    cm = confusion(y_true, y_pred, n)
    prec, rec, f1 = per_class(cm)
    present = cm.sum(1) > 0
    return {
        "top1": float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(cm[i].sum())}
            for i, name in enumerate(names)
        },
        "confusion": cm.tolist(),
    }


def consistency(primary_coarse: np.ndarray, primary_fine: np.ndarray, parents: tuple[tuple[int, ...], ...]) -> float:
    """Share of predictions whose coarse label is a parent of the fine label."""
    if len(primary_fine) == 0:
        return 1.0
    ok = [c in parents[f] for c, f in zip(primary_coarse.tolist(), primary_fine.tolist(), strict=True)]
    return float(np.mean(ok))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """AP of one label (area under the step precision-recall curve); nan when there is no positive."""
    y_true = np.asarray(y_true).astype(bool)
    if not y_true.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = y_true[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    aps = [average_precision(y_true[:, j], scores[:, j]) for j in range(y_true.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else 0.0


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    tp = (y_true & y_pred).sum()
    fp = (~y_true & y_pred).sum()
    fn = (y_true & ~y_pred).sum()
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def multi_label_consistency(coarse_scores: np.ndarray, fine_scores: np.ndarray, parents, threshold=0.5) -> float:
    """Share of rows where every fine tag at/above threshold has at least one coarse parent tagged."""
    if len(fine_scores) == 0:
        return 1.0
    ok = np.ones(len(fine_scores), dtype=bool)
    for f, ps in enumerate(parents):
        fine_on = fine_scores[:, f] >= threshold
        parent_on = np.any(coarse_scores[:, list(ps)] >= threshold, axis=1)
        ok &= ~fine_on | parent_on
    return float(ok.mean())
