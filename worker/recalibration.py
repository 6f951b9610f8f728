"""``styletag calibrate --from-catalog``: fit a checkpoint's score map (``model.calibration.fit_score_map``) on
the validation split of a catalog, without training again, and write it as a new checkpoint. The weights,
temperatures, review score and thresholds and the frame rule are kept; the new file records the run it
came from (``parent``) and its own command. The validation split is the checkpoint's recorded rule (or
the one given); the test split is never read."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from catalog.errors import StyletagError


def recalibrate_from_catalog(checkpoint: Path, out: Path, *, taxonomy_name: str | None = None,
                             split_rule: str | None = None, test_match: str | None = None, procs: int = 2,
                             batch_size: int = 256, device: str | None = None, progress: bool = True,
                             command: str = "") -> dict:
    """Returns {"model_version", "parent", "n", "score_map", "seconds"}."""
    from catalog.settings import Settings
    from model.calibration import MIN_MAP_SAMPLES, fit_score_maps, temperatures
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.predictor import load_model
    from worker.training import decode_images
    from worker.training_eval import _logits, checkpoint_catalog

    t0 = time.time()
    state, _ = load_checkpoint(checkpoint)  # the stored tensors, as they are (load_model's may be fused)
    model, meta, tax, dev = load_model(checkpoint, device)
    if tax.multi_label:
        raise StyletagError(f"{checkpoint}: taxonomy {tax.name!r} is multi-label; a score map is fitted for "
                            "single-label taxonomies only")
    settings = Settings.from_env()
    spec, rule, cat_tax, data = checkpoint_catalog(settings, meta, tax, taxonomy_name=taxonomy_name,
                                                   split_rule=split_rule, test_match=test_match)
    idx = data.index("val")
    if len(idx) < MIN_MAP_SAMPLES:
        raise StyletagError(f"the validation split of taxonomy {cat_tax.name!r} has {len(idx)} labelled products "
                            f"under the rule {rule.to_dict()}; a score map needs at least {MIN_MAP_SAMPLES}")
    images, ok, _, _ = decode_images(settings, [data.uris[i] for i in idx], [data.versions[i] for i in idx], spec,
                                     procs=procs, progress=progress)
    keep = idx[ok]
    logits, _ = _logits(model, images[ok], data.coarse[keep], data.fine[keep], meta, spec, dev, batch_size)
    parent = np.array([p[0] for p in tax.parents], dtype=np.int64)
    t_c, t_f = temperatures(meta)
    score_map = fit_score_maps(logits["coarse_logits"], logits["fine_logits"], logits["coarse_t"], logits["fine_t"],
                               parent, t_c, t_f)
    new = {k: v for k, v in meta.items() if k not in ("model_version", "format")}
    new["parent"] = {k: meta.get(k) for k in ("model_version", "command", "trained_at", "metrics", "parent")}
    new.update(score_map=score_map, command=command)  # trained_at stays: when the weights were trained
    new["metrics"] = {**(meta.get("metrics") or {}),
                      "score_map_fit": {"split": "val", "n": int(len(keep)), "rule": rule.to_dict(),
                                        "fitted_at": datetime.now(UTC).replace(microsecond=0).isoformat()}}
    version = save_checkpoint(out, state, new)
    return {"model_version": version, "parent": meta["model_version"], "n": int(len(keep)), "score_map": score_map,
            "seconds": round(time.time() - t0, 1)}
