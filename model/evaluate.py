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
