"""Calibration and the review threshold, fitted on validation data (never the test split). numpy only.

* :func:`fit_temperature`: one temperature T for a head's logits, minimising the validation NLL; softmax
  scores of ``logits / T`` then mean what they say (:func:`expected_calibration_error`,
  :func:`reliability_table`).
* The review rule: a product goes to a person when its *garment score* is below a threshold. The score is
  computed from the model's logits by :func:`review_scores` (``msp``: the best consistent (coarse, fine)
  pair's probability; ``energy``: ``T * logsumexp(fine / T)``, the free energy of Liu et al. 2020; ``max-logit``),
  the threshold by :func:`fit_review_threshold` so that at most ``max_flag_rate`` of validation garments
  are flagged, and :func:`review_report` measures what share of garments and of non-garments it flags.
"""

from __future__ import annotations

import math

import numpy as np

SCORE_KINDS = ("msp", "energy", "max-logit")


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``targets`` under ``softmax(logits / temperature)``."""
    lp = log_softmax(logits, temperature)
    return float(-lp[np.arange(len(lp)), np.asarray(targets, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    iters: int = 60) -> float:
    """The T in [lo, hi] minimising validation NLL. NLL is convex in 1/T, so a golden-section search on
    1/T finds the optimum without gradients or torch."""
    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, targets, 1 / c), nll(logits, targets, 1 / d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, targets, 1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, targets, 1 / d)
    return float(1 / ((a + b) / 2))


def _bins(confidences: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip((np.asarray(confidences) * n_bins).astype(np.int64), 0, n_bins - 1)


def reliability_table(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Per equal-width confidence bin: ``lo``, ``hi``, ``count``, mean ``confidence``, ``accuracy``
    (None for an empty bin)."""
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    idx = _bins(conf, n_bins)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        rows.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                     "confidence": float(conf[sel].mean()) if n else None,
                     "accuracy": float(ok[sel].mean()) if n else None})
    return rows


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    n = len(confidences)
    if n == 0:
        return 0.0
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in reliability_table(confidences, correct, n_bins) if r["count"]))


def joint_fine_probs(coarse_logits: np.ndarray, fine_logits: np.ndarray, parent: np.ndarray,
                     t_coarse: float = 1.0, t_fine: float = 1.0) -> np.ndarray:
    """The consistent decoding's fine scores (``model.consistency.decode_single``) in numpy:
    p(f) ∝ p_fine(f) * p_coarse(parent(f))."""
    joint = log_softmax(fine_logits, t_fine) + log_softmax(coarse_logits, t_coarse)[:, np.asarray(parent)]
    return softmax(joint)


def review_scores(fine_logits: np.ndarray, kind: str = "msp", *, coarse_logits: np.ndarray | None = None,
                  parent: np.ndarray | None = None, t_fine: float = 1.0, t_coarse: float = 1.0) -> np.ndarray:
    """Garment score per image, higher = more garment-like. ``msp`` uses the consistent joint when
    ``coarse_logits`` and ``parent`` are given, else the fine softmax."""
    if kind == "msp":
        if coarse_logits is not None and parent is not None:
            return joint_fine_probs(coarse_logits, fine_logits, parent, t_coarse, t_fine).max(1)
        return softmax(fine_logits, t_fine).max(1)
    z = np.asarray(fine_logits, dtype=np.float64)
    if kind == "energy":
        m = z.max(1, keepdims=True)
        return (t_fine * (np.log(np.exp((z - m) / t_fine).sum(1)) + m[:, 0] / t_fine))
    if kind == "max-logit":
        return z.max(1)
    raise ValueError(f"unknown score kind {kind!r}; use one of {SCORE_KINDS}")


def fit_review_threshold(garment_scores: np.ndarray, max_flag_rate: float = 0.05) -> float:
    """The largest threshold that flags (score < threshold) at most ``max_flag_rate`` of the validation
    garments."""
    s = np.sort(np.asarray(garment_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no validation scores to fit a threshold on")
    k = int(math.floor(max_flag_rate * len(s)))  # this many may be flagged: those strictly below s[k]
    return float(s[min(k, len(s) - 1)]) if k < len(s) else float(np.nextafter(s[-1], np.inf))


def flag_rate(scores: np.ndarray, threshold: float) -> float:
    s = np.asarray(scores)
    return float((s < threshold).mean()) if len(s) else 0.0


def auroc(garment_scores: np.ndarray, outlier_scores: np.ndarray) -> float:
    """P(score of a random garment > score of a random non-garment), ties counted half."""
    g = np.asarray(garment_scores, dtype=np.float64)
    o = np.asarray(outlier_scores, dtype=np.float64)
    allv = np.concatenate([g, o])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]  # 1-based ranks, ties share their mean rank
    r_g = ranks[: len(g)].sum()
    return float((r_g - len(g) * (len(g) + 1) / 2) / (len(g) * len(o)))


def review_report(garment_scores: np.ndarray, outlier_scores: np.ndarray, threshold: float) -> dict:
    """Share of garments and of non-garments that the threshold sends to review, and the AUROC."""
    return {"threshold": float(threshold), "garments_flagged": flag_rate(garment_scores, threshold),
            "outliers_flagged": flag_rate(outlier_scores, threshold),
            "auroc": auroc(garment_scores, outlier_scores)}
