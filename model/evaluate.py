"""Run a model over a dataset and compute the metrics of ``styletag eval``."""

from __future__ import annotations

import numpy as np
import torch

from . import metrics as M
from .consistency import child_mask, decode_independent, decode_multi, decode_single, parent_index
from .data import as_dataset, fit_channels, iterate_batches, to_input
from .taxonomy import Taxonomy


@torch.inference_mode()
def collect_logits(
    model: torch.nn.Module,
    data,
    *,
    mean,
    std,
    input_size: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels: int | None = None,
) -> dict[str, np.ndarray]:
    """coarse/fine logits and targets of the whole dataset as numpy arrays."""
    device = torch.device(device)
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32)
    std_t = torch.tensor(std, device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"coarse_logits": [], "fine_logits": [], "coarse_t": [], "fine_t": []}
    for x, ct, ft in iterate_batches(as_dataset(data), batch_size):
        x = x.to(device, non_blocking=True)
        if channels:
            x = fit_channels(x, channels)
        xin = to_input(x, mean_t, std_t, input_size, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            c, f = model(xin)
        out["coarse_logits"].append(c.float().cpu())
        out["fine_logits"].append(f.float().cpu())
        out["coarse_t"].append(ct)
        out["fine_t"].append(ft)
    model.train(was_training)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def compute_metrics(taxonomy: Taxonomy, logits: dict[str, np.ndarray], decoding: str = "consistent") -> dict:
    """Metrics from ``collect_logits`` output. ``decoding``: consistent (ours) | independent (seed)."""
    c = torch.from_numpy(logits["coarse_logits"])
    f = torch.from_numpy(logits["fine_logits"])
    n = len(f)
    result: dict = {"n": n, "decoding": decoding, "taxonomy": taxonomy.name}
    if taxonomy.multi_label:
        mask = child_mask(taxonomy.parents, len(taxonomy.coarse.labels))
        if decoding == "consistent":
            cs, fs, _, _ = decode_multi(c, f, mask)
        else:
            cs, fs = torch.sigmoid(c), torch.sigmoid(f)
        cs, fs = cs.numpy(), fs.numpy()
        ct, ft = logits["coarse_t"], logits["fine_t"]
        result.update(
            coarse_map=M.mean_average_precision(ct, cs),
            fine_map=M.mean_average_precision(ft, fs),
            coarse_micro_f1=M.micro_f1(ct, cs >= 0.5),
            fine_micro_f1=M.micro_f1(ft, fs >= 0.5),
            consistency=M.multi_label_consistency(cs, fs, taxonomy.parents),
        )
        return result
    if decoding == "consistent":
        _, _, pc, pf = decode_single(c, f, parent_index(taxonomy.parents))
    elif decoding == "independent":
        pc, pf = decode_independent(c, f)
    elif decoding == "fine-only":  # coarse label derived from the fine prediction's parent
        pf = f.argmax(1)
        pc = parent_index(taxonomy.parents)[pf]
    else:
        raise ValueError(f"unknown decoding {decoding!r}")
    pc, pf = pc.numpy(), pf.numpy()
    coarse = M.single_label_report(logits["coarse_t"], pc, taxonomy.coarse.labels)
    fine = M.single_label_report(logits["fine_t"], pf, taxonomy.fine.labels)
    result.update(
        coarse_top1=coarse["top1"],
        fine_top1=fine["top1"],
        coarse_macro_f1=coarse["macro_f1"],
        fine_macro_f1=fine["macro_f1"],
        consistency=M.consistency(pc, pf, taxonomy.parents),
        coarse=coarse,
        fine=fine,
    )
    return result


def summary(metrics: dict) -> dict:
    """The headline numbers only (what goes into checkpoint metadata and docs)."""
    keys = ("n", "decoding", "coarse_top1", "fine_top1", "coarse_macro_f1", "fine_macro_f1", "consistency",
            "coarse_map", "fine_map", "coarse_micro_f1", "fine_micro_f1")
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items() if k in keys}


def calibration_report(taxonomy: Taxonomy, logits: dict[str, np.ndarray], meta: dict, n_bins: int = 10) -> dict:
    """ECE before and after the checkpoint's temperatures, on the scores the predictor serves (the primary
    fine score of the consistent decoding, and the primary coarse score), and the reliability table of
    the calibrated fine scores; ``bins_within_5_points``: every bin with >= 100 items has |accuracy -
    confidence| <= 0.05."""
    from . import calibration as cal

    if taxonomy.multi_label:
        return {}
    parent = np.array([p[0] for p in taxonomy.parents], dtype=np.int64)
    c, f = logits["coarse_logits"], logits["fine_logits"]
    yf, yc = np.asarray(logits["fine_t"]), np.asarray(logits["coarse_t"])
    out: dict = {"temperature": meta.get("temperature")}
    raw = {k: v for k, v in meta.items() if k not in ("temperature", "score_map")}
    tempered = {k: v for k, v in meta.items() if k != "score_map"}
    variants = [("raw", raw)] + ([("tempered", tempered)] if meta.get("score_map") else []) + [("calibrated", meta)]
    for name, m in variants:
        cs, fs = cal.served_scores(c, f, {**m, "taxonomy": taxonomy.to_dict()})
        pf = fs.argmax(1)
        pc = parent[pf]
        out[f"fine_ece_{name}"] = cal.expected_calibration_error(fs.max(1), pf == yf, 15)
        out[f"coarse_ece_{name}"] = cal.expected_calibration_error(cs[np.arange(len(pc)), pc], pc == yc, 15)
        if name == "calibrated":
            for level, prefix, conf, right in (("fine", "", fs.max(1), pf == yf),
                                               ("coarse", "coarse_", cs[np.arange(len(pc)), pc], pc == yc)):
                table = cal.reliability_table(conf, right, n_bins)
                gaps = [abs(r["accuracy"] - r["confidence"]) for r in table if r["count"] >= 100]
                out[f"reliability_{level}"] = table
                out[f"{prefix}bins_within_5_points"] = all(g <= 0.05 for g in gaps)
                out[f"{prefix}worst_bin_gap_100plus"] = max(gaps, default=0.0)
    return out


def review_report(taxonomy: Taxonomy, logits: dict[str, np.ndarray], meta: dict, images: np.ndarray | None = None,
                  outlier_sets: dict | None = None) -> dict:
    """What the checkpoint's review rule does on garments (coverage = share not flagged, accuracy of the
    covered ones, flagged by each threshold) and on sets of generated non-garments (share flagged, per
    family). ``outlier_sets``: name -> (coarse_logits, fine_logits, images or None, family names)."""
    from . import calibration as cal

    meta = {**meta, "taxonomy": taxonomy.to_dict()}
    rt, ot = meta.get("review_threshold"), meta.get("ood_threshold")
    score = cal.review_score(logits["coarse_logits"], logits["fine_logits"], meta)
    frame = cal.frame_flags(images, meta) if images is not None else np.zeros(len(score), dtype=bool)
    ood = (score < ot if ot is not None else np.zeros(len(score), bool)) | frame
    flagged = ood | (score < rt if rt is not None else np.zeros(len(score), bool))
    m = compute_metrics(taxonomy, logits)
    out: dict = {"review_score": meta.get("review_score"), "review_threshold": rt, "ood_threshold": ot,
                 "frame_rule": meta.get("frame_rule"), "garments": len(score),
                 "garments_flagged": float(flagged.mean()) if len(score) else 0.0,
                 "garments_out_of_distribution": float(ood.mean()) if len(score) else 0.0,
                 "garments_frame_rule": float(frame.mean()) if len(score) else 0.0,
                 "coverage": float(1 - flagged.mean()) if len(score) else 0.0}
    if not taxonomy.multi_label:
        _, _, pc, pf = decode_single(torch.from_numpy(logits["coarse_logits"]), torch.from_numpy(logits["fine_logits"]),
                                     parent_index(taxonomy.parents))
        ok_f = pf.numpy() == np.asarray(logits["fine_t"])
        ok_c = pc.numpy() == np.asarray(logits["coarse_t"])
        keep = ~flagged
        out.update(fine_top1_all=m["fine_top1"], coarse_top1_all=m["coarse_top1"],
                   fine_top1_covered=float(ok_f[keep].mean()) if keep.any() else None,
                   coarse_top1_covered=float(ok_c[keep].mean()) if keep.any() else None,
                   fine_top1_flagged=float(ok_f[flagged].mean()) if flagged.any() else None)
    for name, (oc, of, oimg, fams) in (outlier_sets or {}).items():
        s = cal.review_score(oc, of, meta)
        fr = cal.frame_flags(oimg, meta) if oimg is not None else np.zeros(len(s), dtype=bool)
        o_ood = (s < ot if ot is not None else np.zeros(len(s), bool)) | fr
        o_flag = o_ood | (s < rt if rt is not None else np.zeros(len(s), bool))
        fams = np.asarray(fams)
        out[name] = {"n": len(s), "flagged": float(o_flag.mean()), "out_of_distribution": float(o_ood.mean()),
                     "frame_rule": float(fr.mean()), "auroc_vs_garments": cal.auroc(score, s),
                     "per_family": {str(f): round(float(o_flag[fams == f].mean()), 4) for f in sorted(set(fams.tolist()))}}
    return out
