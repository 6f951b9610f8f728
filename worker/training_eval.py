"""``styletag eval --from-catalog``: a checkpoint on the test split of a catalog (the split rule recorded in the
checkpoint, or one given), with everything the photo model promises: fine / coarse accuracy and consistency,
calibration (ECE and the reliability table), the review rule (coverage and accuracy at its threshold,
share of generated non-garments flagged, by family), colour naming against the catalog's colour truth, and
optionally a deliberately different rendering of the Fashion-MNIST test split. Images go through the same
reader and preprocessing as the worker's (``worker.training``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from catalog.errors import StyletagError


def _logits(model, images: np.ndarray, coarse, fine, meta: dict, spec, device, batch_size: int) -> tuple[dict, float]:
    from model.data import ArraySet
    from model.evaluate import collect_logits

    t0 = time.perf_counter()
    logits = collect_logits(model, ArraySet(images, coarse, fine), mean=spec.mean, std=spec.std,
                            input_size=spec.input_size, batch_size=batch_size, device=device,
                            channels=spec.channels)
    return logits, time.perf_counter() - t0


def _accuracy(tax, logits: dict, decoding: str) -> dict:
    from model.evaluate import compute_metrics, summary

    m = compute_metrics(tax, logits, decoding)
    out = summary(m)
    if not tax.multi_label:
        out["per_class"] = {lvl: {n: {"precision": round(v["precision"], 4), "recall": round(v["recall"], 4),
                                      "support": v["support"]} for n, v in m[lvl]["per_class"].items()}
                            for lvl in ("coarse", "fine")}
        out["confusion_fine"] = m["fine"]["confusion"]
    return out, m


def checkpoint_catalog(settings, meta: dict, tax, *, taxonomy_name: str | None = None,
                       split_rule: str | None = None, test_match: str | None = None):
    """(preprocessing spec, split rule, catalog taxonomy, labelled products) of a checkpoint on the catalog:
    the checkpoint's preprocessing and recorded split rule (``split_rule`` / ``test_match`` override it),
    the taxonomy renamed to ``taxonomy_name`` if given. ``eval`` and ``calibrate`` read a catalog this way."""
    from model.preprocess import PreprocessSpec
    from worker.training import SplitRule, load_catalog_set

    spec = PreprocessSpec.from_checkpoint_meta(meta)
    if not meta.get("preprocess"):  # legacy metadata: normalisation from the top-level keys
        spec = replace(spec, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    rule = SplitRule.from_dict((meta.get("data") or {}).get("split") or {})
    if split_rule:
        rule = SplitRule.parse(split_rule, test_match if test_match is not None else rule.test_match)
    elif test_match is not None:
        rule = replace(rule, test_match=test_match)
    cat_tax = replace(tax, name=taxonomy_name) if taxonomy_name else tax
    return spec, rule, cat_tax, load_catalog_set(settings, cat_tax, rule)


def evaluate_from_catalog(checkpoint: Path, *, taxonomy_name: str | None = None, split_name: str = "test",
                          split_rule: str | None = None, test_match: str | None = None, outliers: int = 2000,
                          colour: bool = True, robust_fmnist: int = 0, limit: int | None = None, source=None,
                          batch_size: int = 256, device: str | None = None, decoding: str = "consistent",
                          procs: int = 2, plots: Path | None = None, progress: bool = True,
                          command: str = "") -> dict:
    import torch

    from catalog.settings import Settings, redact_url
    from model.evaluate import calibration_report, review_report
    from model.outliers import HELD_OUT_FAMILIES, TRAIN_FAMILIES
    from model.predictor import load_model
    from worker.training import (
        colour_report,
        decode_images,
        generated_outliers,
    )

    settings = Settings.from_env()
    model, meta, tax, dev = load_model(checkpoint, device)
    spec, rule, cat_tax, data = checkpoint_catalog(settings, meta, tax, taxonomy_name=taxonomy_name,
                                                   split_rule=split_rule, test_match=test_match)
    idx = data.index(split_name)
    if limit:
        idx = idx[:limit]
    if len(idx) == 0:
        raise StyletagError(f"the {split_name} split of taxonomy {cat_tax.name!r} is empty under the rule "
                            f"{rule.to_dict()}; pass --split-rule / --test-match for this catalog")
    t0 = time.time()
    images, ok, reasons, analysis = decode_images(settings, [data.uris[i] for i in idx],
                                                  [data.versions[i] for i in idx], spec, procs=procs, progress=progress)
    keep = idx[ok]
    images = images[ok]
    analysis = analysis.subset(ok)
    logits, model_s = _logits(model, images, data.coarse[keep], data.fine[keep], meta, spec, dev, batch_size)
    acc, m = _accuracy(tax, logits, decoding)
    report: dict = {
        "checkpoint": str(checkpoint), "model_version": meta["model_version"], "command": command,
        "trained_by": meta.get("command"), "catalog": redact_url(settings.database_url), "taxonomy": cat_tax.name,
        "split": split_name, "split_rule": rule.to_dict(), "n": int(len(keep)), "unreadable": dict(reasons),
        "preprocess": spec.to_dict(), "backbone": meta.get("backbone"), **acc,
        "model_images_per_s": round(len(keep) / model_s, 1) if model_s > 0 else None,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
    }
    report["calibration"] = calibration_report(tax, logits, meta)
    sets = {}
    if outliers > 0:
        for name, fams, seed in (("non_garments_train_families", TRAIN_FAMILIES, 3),
                                 ("non_garments_held_out_families", HELD_OUT_FAMILIES, 4)):
            o_img, o_fam, _ = generated_outliers(settings, spec, outliers, fams, seed=seed, procs=procs,
                                                    progress=progress)
            z = np.zeros(len(o_img), np.int64)
            ol, _ = _logits(model, o_img, z, z, meta, spec, dev, batch_size)
            sets[name] = (ol["coarse_logits"], ol["fine_logits"], o_img, o_fam)
    report["review"] = review_report(tax, logits, meta, images, sets)
    if colour:
        truth = [data.colours[i] for i in keep]
        if any(truth):
            report["colour"] = colour_report(truth, analysis.colours)
        else:
            report["colour"] = {"n": 0, "note": "no colour truth in this catalog"}
    if robust_fmnist:
        report["robust"] = _robust(model, meta, tax, spec, dev, robust_fmnist, source, batch_size, decoding, procs,
                                   progress)
    if plots is not None and not tax.multi_label:
        from model.plots import plot_confusion

        report["plots"] = [str(plot_confusion(m[lvl]["confusion"], names, plots / f"confusion-{lvl}.png",
                                              f"{lvl} ({m[lvl]['top1']:.2%} top-1)"))
                           for lvl, names in (("coarse", tax.coarse.labels), ("fine", tax.fine.labels))]
    report["seconds"] = round(time.time() - t0, 1)
    report["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return report


def _robust(model, meta, tax, spec, dev, n, source, batch_size, decoding, procs, progress) -> dict:
    from model.evaluate import calibration_report, review_report
    from model.fmnist import CLASSES
    from worker.training import colour_report, robust_fashion_mnist

    missing = [c for c in CLASSES if c not in tax.fine.labels]
    if missing:
        raise StyletagError(f"--robust-fmnist needs the Fashion-MNIST classes in the checkpoint's taxonomy "
                            f"(missing {missing[0]!r})")
    images, labels, colours_true, analysis = robust_fashion_mnist(spec, n, source=source, procs=procs,
                                                                  progress=progress)
    fine = np.array([tax.fine.labels.index(CLASSES[k]) for k in labels], dtype=np.int64)
    coarse = np.array([tax.parents[f][0] for f in fine], dtype=np.int64)
    logits, _ = _logits(model, images, coarse, fine, meta, spec, dev, batch_size)
    acc, _ = _accuracy(tax, logits, decoding)
    acc.pop("confusion_fine", None)
    return {"n": n, "renderer": "model.render.ROBUST_STYLE, seeds [9, i], JPEG quality 70-95", **acc,
            "calibration": {k: v for k, v in calibration_report(tax, logits, meta).items()
                            if not k.startswith("reliability")},
            "review": review_report(tax, logits, meta, images, {}),
            "colour": colour_report(colours_true, analysis.colours)}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def print_report(r: dict, echo: Callable[[str], None]) -> None:
    echo(f"checkpoint {r['checkpoint']} (model_version {r['model_version']}), catalog {r['catalog']}, "
         f"taxonomy {r['taxonomy']}, {r['split']} split: n={r['n']}"
         + (f", unreadable {r['unreadable']}" if r["unreadable"] else ""))
    for k in ("fine_top1", "coarse_top1", "fine_macro_f1", "coarse_macro_f1", "consistency", "fine_map", "coarse_map",
              "fine_micro_f1", "coarse_micro_f1"):
        if k in r:
            echo(f"  {k:18s} {r[k]:.4f}")
    c = r.get("calibration") or {}
    if c:
        steps = [k for k in ("raw", "tempered", "calibrated") if f"fine_ece_{k}" in c]
        echo(f"  calibration: temperature {c.get('temperature')}"
             + (", score map" if "tempered" in steps else "") + f"; ECE ({' -> '.join(steps)}) fine "
             + " -> ".join(_pct(c[f"fine_ece_{k}"]) for k in steps) + ", coarse "
             + " -> ".join(_pct(c[f"coarse_ece_{k}"]) for k in steps))
        for level in ("fine", "coarse"):
            echo(f"  reliability ({level}, calibrated): bin  count  confidence  accuracy")
            for row in c[f"reliability_{level}"]:
                if row["count"]:
                    echo(f"    {row['lo']:.1f}-{row['hi']:.1f} {row['count']:6d}  {row['confidence']:.3f}      "
                         f"{row['accuracy']:.3f}")
        echo(f"  every bin with >= 100 items within 5 points: fine {c['bins_within_5_points']} "
             f"(worst gap {_pct(c['worst_bin_gap_100plus'])}), coarse {c['coarse_bins_within_5_points']} "
             f"(worst gap {_pct(c['coarse_worst_bin_gap_100plus'])})")
    v = r.get("review") or {}
    if v:
        echo(f"  review ({(v.get('review_score') or {}).get('kind', 'msp')} score; review threshold "
             f"{v['review_threshold']}, ood threshold {v['ood_threshold']}): coverage {_pct(v['coverage'])}, "
             f"garments flagged {_pct(v['garments_flagged'])} (out of distribution {_pct(v['garments_out_of_distribution'])})")
        if "fine_top1_covered" in v:
            echo(f"    accuracy at the threshold: fine {_pct(v['fine_top1_covered'])}, coarse "
                 f"{_pct(v['coarse_top1_covered'])} on the covered; fine {_pct(v['fine_top1_flagged'])} on the flagged")
        for name in ("non_garments_train_families", "non_garments_held_out_families"):
            if name in v:
                o = v[name]
                echo(f"    {name}: {o['n']} flagged {_pct(o['flagged'])} (out of distribution "
                     f"{_pct(o['out_of_distribution'])}), AUROC {o['auroc_vs_garments']:.4f}")
                echo("      " + ", ".join(f"{k} {100 * x:.0f} %" for k, x in o["per_family"].items()))
    col = r.get("colour")
    if col and col.get("n"):
        echo(f"  colour (dominant_colours vs truth, n={col['n']}): primary {_pct(col['primary_accuracy'])}, exact set "
             f"{_pct(col['set_exact'])}, any overlap {_pct(col['any_overlap'])}")
    rb = r.get("robust")
    if rb:
        echo(f"  robust rendering (n={rb['n']}): fine {_pct(rb['fine_top1'])}, coarse {_pct(rb['coarse_top1'])}, "
             f"consistency {_pct(rb['consistency'])}, ECE fine {_pct(rb['calibration'].get('fine_ece_calibrated'))}, "
             f"garments flagged {_pct(rb['review']['garments_flagged'])}, colour primary "
             f"{_pct(rb['colour'].get('primary_accuracy'))}")
    echo(f"  model only: {r['model_images_per_s']} images/s ({r['torch_threads']} threads); {r['seconds']} s")
