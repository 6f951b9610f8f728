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


def fit_temperature(logits: np.ndarray, targets: np.ndarray, lo: float = 0.01, hi: float = 20.0,
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


# --------------------------------------------------------------------------- what a checkpoint serves
#
# The metadata keys written by training (``fit_serving_calibration``) and read at serving time:
#   "temperature":      {"coarse": Tc, "fine": Tf}: logits are divided by these before decoding
#                       (``model.consistency``), so the served scores are calibrated on validation;
#   "review_score":     {"kind": "msp" | "max-logit" | "energy", "center": m, "scale": s}: how
#                       :func:`review_score` turns logits into a garment score in [0, 1];
#   "review_threshold": a product whose review score is below it is held for review (low confidence);
#   "ood_threshold":    below it, the product is out of distribution (a lower threshold than review's);
#   "frame_rule":       {"min_foreground": a, "max_border": b}: :func:`frame_flags` on the model's uint8
#                       input (no garment found; a foreground spanning the whole frame) -> out of distribution.
#   "score_map":        {"fine": {"x": [...], "y": [...]}, "coarse": {...}} (single-label taxonomies): a
#                       monotone piecewise-linear map of each level's served score, fitted on validation by
#                       isotonic regression of top-1 correctness on the tempered score (:func:`fit_score_map`).
#                       A temperature fixes the overall sharpness; the map fixes the shape (the tempered scores
#                       were over-confident in the 0.7-0.9 range and under-confident below 0.5). A coarse score
#                       stays >= each child's (:func:`map_scores`).
# A checkpoint without these keys serves raw scores and holds nothing (``review_score`` is then the msp).


def temperatures(meta: dict) -> tuple[float, float]:
    """(T_coarse, T_fine) of a checkpoint's metadata; (1, 1) without a ``temperature`` key. A number
    applies to both heads."""
    t = meta.get("temperature")
    if t is None:
        return 1.0, 1.0
    if isinstance(t, int | float):
        return float(t), float(t)
    return float(t.get("coarse", 1.0)), float(t.get("fine", 1.0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def raw_review_scores(coarse_logits: np.ndarray, fine_logits: np.ndarray, kind: str, parent=None,
                      t_coarse: float = 1.0, t_fine: float = 1.0) -> np.ndarray:
    """The unsquashed score of ``kind`` (higher = more garment-like). Multi-label taxonomies (``parent``
    None): msp is the best fine sigmoid."""
    if kind == "msp" and parent is None:
        return _sigmoid(np.asarray(fine_logits, dtype=np.float64) / t_fine).max(1)
    return review_scores(fine_logits, kind, coarse_logits=coarse_logits, parent=parent, t_fine=t_fine,
                         t_coarse=t_coarse)


def _parent_of(meta: dict):
    levels = meta["taxonomy"]["levels"]
    coarse = list(levels["coarse"]["labels"])
    fine = levels["fine"]["labels"]
    if levels["coarse"].get("multi_label") or levels["fine"].get("multi_label") or any(
            len(f["parents"]) != 1 for f in fine):
        return None
    return np.array([coarse.index(f["parents"][0]) for f in fine], dtype=np.int64)


def review_score(coarse_logits: np.ndarray, fine_logits: np.ndarray, meta: dict) -> np.ndarray:
    """THE garment score of each image, in [0, 1], as a checkpoint defines it (training fits the thresholds
    on it, serving compares it with ``review_threshold`` and ``ood_threshold``). Logits are the raw network
    outputs; the temperatures and the score's kind come from ``meta``."""
    t_c, t_f = temperatures(meta)
    spec = meta.get("review_score") or {"kind": "msp"}
    kind = spec.get("kind", "msp") if isinstance(spec, dict) else str(spec)
    raw = raw_review_scores(coarse_logits, fine_logits, kind, _parent_of(meta), t_c, t_f)
    if kind == "msp":
        return raw
    return _sigmoid((raw - float(spec["center"])) / float(spec["scale"]))


def frame_flags(images: np.ndarray, meta: dict) -> np.ndarray:
    """Per uint8 model input [N, H, W, C] (what ``model.preprocess.decode_image`` returned): True when the
    frame rule of ``meta`` says it holds no garment: almost no foreground, or foreground all along the
    frame's border (noise, a pattern, a full-frame colour). Only for the backdrop-distance representations
    (channel 0 is the distance from the backdrop); all False without a ``frame_rule``."""
    x = np.asarray(images)
    rule = meta.get("frame_rule")
    if not rule or x.ndim != 4 or len(x) == 0:
        return np.zeros(len(x), dtype=bool)
    fg = x[..., 0] >= int(rule.get("level", 64))
    area = fg.mean((1, 2))
    border = np.concatenate([fg[:, 0, :], fg[:, -1, :], fg[:, :, 0], fg[:, :, -1]], 1).mean(1)
    return (area < float(rule["min_foreground"])) | (border > float(rule["max_border"]))


def out_of_distribution(coarse_logits: np.ndarray, fine_logits: np.ndarray, meta: dict,
                        images: np.ndarray | None = None) -> np.ndarray:
    """True where the image is no garment: review score under ``ood_threshold``, or the frame rule."""
    score = review_score(coarse_logits, fine_logits, meta)
    thr = meta.get("ood_threshold")
    flags = score < float(thr) if thr is not None else np.zeros(len(score), dtype=bool)
    if images is not None:
        flags = flags | frame_flags(images, meta)
    return flags


def flagged_for_review(coarse_logits: np.ndarray, fine_logits: np.ndarray, meta: dict,
                       images: np.ndarray | None = None) -> np.ndarray:
    """True where serving holds the product for review, for either reason: out of distribution
    (:func:`out_of_distribution`) or a review score under ``review_threshold`` (low confidence)."""
    flags = out_of_distribution(coarse_logits, fine_logits, meta, images)
    thr = meta.get("review_threshold")
    if thr is not None:
        flags = flags | (review_score(coarse_logits, fine_logits, meta) < float(thr))
    return flags


def served_scores(coarse_logits: np.ndarray, fine_logits: np.ndarray, meta: dict):
    """(coarse scores, fine scores) as the predictor serves them (temperatures applied, consistent
    decoding), in numpy: for evaluation without torch."""
    t_c, t_f = temperatures(meta)
    parent = _parent_of(meta)
    if parent is None:
        fine = _sigmoid(np.asarray(fine_logits, dtype=np.float64) / t_f)
        return _sigmoid(np.asarray(coarse_logits, dtype=np.float64) / t_c), fine
    return map_scores(*consistent_scores(coarse_logits, fine_logits, parent, t_c, t_f), parent,
                      meta.get("score_map"))


def consistent_scores(coarse_logits: np.ndarray, fine_logits: np.ndarray, parent: np.ndarray, t_c: float = 1.0,
                      t_f: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(coarse, fine) of the consistent decoding with temperatures, before any score map: the fine scores are
    the joint pair probabilities, a coarse score the sum of its children's."""
    fine = joint_fine_probs(coarse_logits, fine_logits, parent, t_c, t_f)
    coarse = np.zeros((len(fine), int(np.max(parent)) + 1))
    np.add.at(coarse.T, parent, fine.T)
    return coarse, fine


# --------------------------------------------------------------------------- the score map

MAP_KNOTS = 48
MIN_MAP_SAMPLES = 500  # fewer validation samples: no score map (an isotonic fit on a few dozen would follow noise)


def _isotonic(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators on ``y`` with weights ``w`` (already ordered by the score): (block values,
    block sizes in items) of the non-decreasing weighted least-squares fit."""
    vals: list[float] = []
    wts: list[float] = []
    lens: list[int] = []
    for v, wt in zip(y.tolist(), w.tolist(), strict=True):
        vals.append(float(v))
        wts.append(float(wt))
        lens.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            total = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / total
            wts[-2] = total
            lens[-2] += lens[-1]
            vals.pop()
            wts.pop()
            lens.pop()
    return np.array(vals), np.array(lens)


def fit_score_map(confidences: np.ndarray, correct: np.ndarray, knots: int = MAP_KNOTS) -> dict:
    """``{"x": [...], "y": [...]}``: the isotonic regression (Zadrozny & Elkan 2002) of ``correct`` (top-1
    right, on validation) on ``confidences`` (the served top-1 score), read off at up to ``knots`` quantiles of
    the confidences and extended flat to 0 and 1; applied by linear interpolation (:func:`apply_map`), so it
    is monotone, stays in [0, 1] and is small enough for the checkpoint's metadata."""
    conf = np.asarray(confidences, dtype=np.float64)
    if len(conf) < 2:
        raise ValueError("a score map needs at least two validation samples")
    order = np.argsort(conf, kind="stable")
    x = conf[order]
    vals, lens = _isotonic(np.asarray(correct, dtype=np.float64)[order], np.ones(len(x)))
    ends = np.cumsum(lens)
    centres = np.array([x[e - n : e].mean() for e, n in zip(ends, lens, strict=True)])
    qs = np.unique(np.quantile(x, np.linspace(0, 1, max(2, knots - 2))))
    ys = np.interp(qs, centres, vals)
    inner = (qs > 0) & (qs < 1)
    xs = np.concatenate([[0.0], qs[inner], [1.0]])  # flat beyond the validation scores at both ends
    ys = np.concatenate([[ys[inner][0] if inner.any() else float(vals[0])], ys[inner], [float(vals[-1])]])
    # a slope of 1e-3 makes the map strictly increasing: no two scores of an image tie after it, so the
    # primary label (the best score) is the same before and after the map
    ys = (1 - 1e-3) * np.maximum.accumulate(np.clip(ys, 0.0, 1.0)) + 1e-3 * xs
    return {"x": [float(v) for v in xs], "y": [float(v) for v in ys]}  # unrounded: rounding could make ties


def check_score_map(raw, multi_label: bool) -> None:
    """ValueError (one line) unless ``raw`` is a well-formed score map for such a taxonomy."""
    if multi_label:
        raise ValueError("a score map is only defined for single-label taxonomies")
    if not isinstance(raw, dict) or set(raw) != {"fine", "coarse"}:
        raise ValueError("must be {'fine': {'x': [...], 'y': [...]}, 'coarse': {...}}")
    for level, m in raw.items():
        if not isinstance(m, dict) or not isinstance(m.get("x"), list) or not isinstance(m.get("y"), list):
            raise ValueError(f"{level}: must be {{'x': [...], 'y': [...]}}")
        x, y = m["x"], m["y"]
        if len(x) != len(y) or len(x) < 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in x + y):
            raise ValueError(f"{level}: x and y must be lists of at least two numbers of the same length")
        if not (x[0] == 0 and x[-1] == 1 and all(a < b for a, b in zip(x, x[1:], strict=False))):
            raise ValueError(f"{level}: x must rise strictly from 0 to 1")
        if not (all(0 <= v <= 1 for v in y) and all(a < b for a, b in zip(y, y[1:], strict=False))):
            raise ValueError(f"{level}: y must rise strictly within [0, 1] (a flat part would tie labels)")


def apply_map(scores: np.ndarray, m: dict) -> np.ndarray:
    s = np.asarray(scores)
    return np.interp(s, m["x"], m["y"]).astype(s.dtype if s.dtype.kind == "f" else np.float64)


def map_scores(coarse: np.ndarray, fine: np.ndarray, parent, score_map: dict | None):
    """(coarse, fine) scores through the checkpoint's score map (unchanged without one). Each coarse score
    is then raised to its best child's mapped score, so a fine tag over its threshold still brings its
    parent, and the order of labels within a level (the primary pair) does not change."""
    if not score_map:
        return coarse, fine
    fine = apply_map(fine, score_map["fine"])
    coarse = apply_map(coarse, score_map["coarse"])
    for j, p in enumerate(np.asarray(parent).tolist()):
        coarse[:, p] = np.maximum(coarse[:, p], fine[:, j])
    return coarse, fine


# --------------------------------------------------------------------------- fitting on validation


def fit_joint_temperatures(coarse_logits: np.ndarray, fine_logits: np.ndarray, fine_targets: np.ndarray,
                           parent: np.ndarray, rounds: int = 3) -> tuple[float, float]:
    """(T_coarse, T_fine) minimising the NLL of the *served* fine scores (the consistent joint) on
    validation: coordinate descent, each step a golden-section search."""
    y = np.asarray(fine_targets, dtype=np.int64)

    def joint_nll(tc: float, tf: float) -> float:
        p = joint_fine_probs(coarse_logits, fine_logits, parent, tc, tf)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())

    tc = tf = 1.0
    for _ in range(rounds):
        tf = _golden(lambda t, tc=tc: joint_nll(tc, t))
        tc = _golden(lambda t, tf=tf: joint_nll(t, tf))
    return tc, tf


def _golden(f, lo: float = 0.01, hi: float = 20.0, iters: int = 40) -> float:
    """argmin of f over T in [lo, hi], searched on 1/T."""
    a, b = 1.0 / hi, 1.0 / lo
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(1 / c), f(1 / d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(1 / c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(1 / d)
    return float(1 / ((a + b) / 2))


def fit_score_maps(coarse_logits: np.ndarray, fine_logits: np.ndarray, coarse_targets: np.ndarray,
                   fine_targets: np.ndarray, parent, t_c: float, t_f: float) -> dict:
    """The ``score_map`` of a single-label checkpoint: one :func:`fit_score_map` per level, on the top-1
    scores the temperatures ``(t_c, t_f)`` serve (validation)."""
    parent = np.asarray(parent, dtype=np.int64)
    coarse, fine = consistent_scores(coarse_logits, fine_logits, parent, t_c, t_f)
    pf = fine.argmax(1)
    pc = parent[pf]
    rows = np.arange(len(pf))
    return {"fine": fit_score_map(fine[rows, pf], pf == np.asarray(fine_targets)),
            "coarse": fit_score_map(coarse[rows, pc], pc == np.asarray(coarse_targets))}


def fit_sigmoid_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """T minimising the mean binary cross-entropy of ``sigmoid(logits / T)`` (multi-label levels)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)

    def bce(t: float) -> float:
        p = np.clip(_sigmoid(z / t), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    return _golden(bce)


def fit_frame_rule(garment_images: np.ndarray, max_flag_rate: float = 0.005, level: int = 64) -> dict:
    """The loosest frame rule that flags at most ``max_flag_rate`` of validation garments."""
    fg = np.asarray(garment_images)[..., 0] >= level
    area = fg.mean((1, 2))
    border = np.concatenate([fg[:, 0, :], fg[:, -1, :], fg[:, :, 0], fg[:, :, -1]], 1).mean(1)
    q = max_flag_rate / 2
    return {"level": level, "min_foreground": float(min(np.quantile(area, q), 0.05)),
            "max_border": float(max(np.quantile(border, 1 - q), 0.6))}


def fit_serving_calibration(coarse_logits: np.ndarray, fine_logits: np.ndarray, coarse_targets: np.ndarray,
                            fine_targets: np.ndarray, parent, outlier_coarse: np.ndarray | None = None,
                            outlier_fine: np.ndarray | None = None, *, review_rate: float = 0.04,
                            ood_rate: float = 0.01, kinds: tuple[str, ...] = SCORE_KINDS,
                            garment_images: np.ndarray | None = None,
                            outlier_images: np.ndarray | None = None, frame_rate: float = 0.005) -> dict:
    """Every serving key of the metadata (see above), fitted on VALIDATION garments (and validation
    non-garments, when given, to choose the score's kind: the kind that flags the most of them at the
    garment rate ``review_rate``). ``review_threshold`` flags ``review_rate`` of the validation garments,
    ``ood_threshold`` ``ood_rate``. Returns the keys and a ``fit`` report (bookkeeping)."""
    if parent is None:  # multi-label: one temperature per head, sigmoid scores
        t_c = fit_sigmoid_temperature(coarse_logits, coarse_targets)
        t_f = fit_sigmoid_temperature(fine_logits, fine_targets)
    else:
        t_c, t_f = fit_joint_temperatures(coarse_logits, fine_logits, fine_targets, parent)
    frame = None
    if garment_images is not None and len(garment_images) and garment_images.shape[-1] >= 1:
        frame = fit_frame_rule(garment_images, frame_rate)
    report: dict = {"kinds": {}}
    best = None
    for kind in kinds:
        if parent is None and kind != "msp" and kind != "max-logit":
            continue
        g = raw_review_scores(coarse_logits, fine_logits, kind, parent, t_c, t_f)
        spec: dict = {"kind": kind}
        if kind != "msp":
            lo, hi = np.quantile(g, [0.01, 0.5])
            spec.update(center=float(lo), scale=float(max((hi - lo) / 4, 1e-6)))
        score_g = _squash(g, spec)
        thr = fit_review_threshold(score_g, review_rate)
        row = {"threshold": thr, "val_garments_flagged": flag_rate(score_g, thr)}
        if outlier_fine is not None and len(outlier_fine):
            o = _squash(raw_review_scores(outlier_coarse, outlier_fine, kind, parent, t_c, t_f), spec)
            flagged = o < thr
            if frame is not None and outlier_images is not None:
                flagged = flagged | _frame(outlier_images, frame)
            row["val_outliers_flagged"] = float(flagged.mean())
            row["auroc"] = auroc(score_g, o)
        report["kinds"][kind] = row
        key = (row.get("val_outliers_flagged", 0.0), row.get("auroc", 0.0), kind == "msp")
        if best is None or key > best[0]:
            best = (key, kind, spec, score_g)
    _, kind, spec, score_g = best
    out = {
        "temperature": {"coarse": round(t_c, 6), "fine": round(t_f, 6)},
        **({"score_map": fit_score_maps(coarse_logits, fine_logits, coarse_targets, fine_targets, parent,
                                        t_c, t_f)} if parent is not None and len(fine_targets) >= MIN_MAP_SAMPLES
           else {}),
        "review_score": spec,
        "review_threshold": fit_review_threshold(score_g, review_rate),
        "ood_threshold": fit_review_threshold(score_g, ood_rate),
    }
    if frame is not None:
        out["frame_rule"] = frame
    report.update(chosen=kind, review_rate=review_rate, ood_rate=ood_rate)
    return {**out, "fit": report}


def _squash(raw: np.ndarray, spec: dict) -> np.ndarray:
    if spec["kind"] == "msp":
        return np.asarray(raw, dtype=np.float64)
    return _sigmoid((raw - spec["center"]) / spec["scale"])


def _frame(images: np.ndarray, rule: dict) -> np.ndarray:
    return frame_flags(images, {"frame_rule": rule})
