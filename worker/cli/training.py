"""``styletag train`` and ``styletag eval``: on the catalog's own labelled products (``--from-catalog``), or
on Fashion-MNIST (``--data fmnist|fmnist-mosaic``, the engine in ``model.cli``).

From the catalog, nothing is assumed about the classes, channels or statistics: the taxonomy is the
catalog's, the preprocessing is the one spec given here (recorded in the checkpoint, used by serving),
the split is a hash of the SKU (recorded too), and the test split is only ever read by ``eval``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from catalog.errors import StyletagError
from model.cli import DATASETS, _command_line
from model.cli import eval_cmd as fmnist_eval_cmd
from model.cli import train_cmd as fmnist_train_cmd

LAB_DELTA_NORM = ((0.2860, 0.5, 0.5), (0.3530, 0.25, 0.25))  # channel 0 like Fashion-MNIST; the deltas centred
DISTANCE_NORM = ((0.2860,), (0.3530,))
CATALOG_ONLY = ("taxonomy_name", "split", "test_match", "channels", "representation", "fit", "foreground_crop",
                "margin", "outliers", "val_outliers", "oe_weight", "review_rate", "ood_rate", "procs")


def _progress(no_progress: bool) -> bool:
    return not no_progress and sys.stderr.isatty()


def _spec(channels, input_size, representation, fit, foreground_crop, margin, backbone):
    from model.net import MIN_INPUT_SIZE
    from model.preprocess import PreprocessSpec

    if representation == "lab-delta":
        channels = channels or 3
    elif representation == "distance":
        channels = channels or 1
    channels = int(channels or 3)
    size = input_size or max(28, MIN_INPUT_SIZE.get(backbone, 32))
    try:
        return PreprocessSpec(channels=channels, input_size=size, fit=fit, foreground_crop=foreground_crop,
                              representation=representation, margin=margin)
    except ValueError as exc:
        raise StyletagError(f"preprocessing: {exc}") from None


def _norm(spec, images):
    """Mean/std per channel: fixed for the backdrop-distance representations (so a Fashion-MNIST model's
    weights fit channel 0), else measured on (a sample of) the training images."""
    import numpy as np

    if spec.representation == "lab-delta":
        return LAB_DELTA_NORM
    if spec.representation == "distance" and spec.channels == 1:
        return DISTANCE_NORM
    sample = images[:: max(1, len(images) // 5000)].astype(np.float32) / 255.0
    mean = tuple(round(float(v), 4) for v in sample.mean((0, 1, 2)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in sample.std((0, 1, 2)))
    return mean, std


@click.command("train")
@click.option("--from-catalog", is_flag=True, help="Train on the catalog's products with style_truth of --taxonomy.")
@click.option("--taxonomy", "taxonomy_name", default=None,
              help="The catalog's taxonomy (--from-catalog), else a shipped name or JSON path (default fashion-mnist).")
@click.option("--split", default="80/10/10", show_default=True, help="train/val/test percentages by SKU hash.")
@click.option("--test-match", default=None, metavar="GLOB",
              help="SKUs matching this glob are the test split; the others share train/val in their ratio.")
@click.option("--data", "data_name", type=click.Choice(DATASETS), default=None, help="Without --from-catalog.")
@click.option("--source", type=click.Path(path_type=Path), default=None, help="Directory of the IDX files.")
@click.option("--backbone", default="resnet-small", show_default=True)
@click.option("--pretrained", default=None, is_flag=False, flag_value="imagenet", metavar="imagenet|PATH",
              help="Start the backbone from torchvision's ImageNet weights (its cache, TORCH_HOME) or a local file.")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint's weights (heads of another taxonomy start fresh; a grey stem is "
                   "adapted to the input's channels).")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Default: 3 (1 for 'distance').")
@click.option("--input-size", type=int, default=None, help="Default: 28 for small backbones, else 32.")
@click.option("--representation", type=click.Choice(["lab-delta", "distance", "as-is", "invert"]),
              default="lab-delta", show_default=True)
@click.option("--fit", type=click.Choice(["pad", "crop", "stretch"]), default="pad", show_default=True)
@click.option("--foreground-crop/--no-foreground-crop", default=True, show_default=True)
@click.option("--margin", type=float, default=0.0, show_default=True, help="Around the foreground box.")
@click.option("--outliers", type=int, default=6000, show_default=True,
              help="Generated non-garment images for outlier exposure (model.outliers TRAIN_FAMILIES).")
@click.option("--val-outliers", type=int, default=1000, show_default=True,
              help="Generated non-garments (other seeds) for choosing the review score on validation.")
@click.option("--oe-weight", type=float, default=0.5, show_default=True, help="Outlier-exposure loss weight (0: off).")
@click.option("--review-rate", type=float, default=0.04, show_default=True,
              help="Share of validation garments under the review threshold.")
@click.option("--ood-rate", type=float, default=0.01, show_default=True,
              help="Share of validation garments under the out-of-distribution threshold.")
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--patience", type=int, default=0, show_default=True, help="Early stopping on validation (0: off).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True)
@click.option("--warmup", type=float, default=0.15, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--w-coarse", type=float, default=1.0, show_default=True)
@click.option("--w-fine", type=float, default=1.0, show_default=True)
@click.option("--no-gate", is_flag=True, help="Ablation: no gate; the fine head reads the features directly.")
@click.option("--no-augment", is_flag=True)
@click.option("--erase-p", type=float, default=None, help="Random erasing (default 0.25 photos, 0.5 Fashion-MNIST).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N training items.")
@click.option("--val-limit", type=int, default=None, help="Per-epoch validation on the first N validation items.")
@click.option("--val-share", type=click.FloatRange(0, 0.5), default=0.1, show_default=True,
              help="Fashion-MNIST: share of its training split held out for validation.")
@click.option("--procs", type=int, default=2, show_default=True, help="Processes decoding and rendering images.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint path (.safetensors).")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue an interrupted run.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def train_cmd(ctx, from_catalog, taxonomy_name, split, test_match, data_name, source, backbone, pretrained, init,
              channels, input_size, representation, fit, foreground_crop, margin, outliers, val_outliers, oe_weight,
              review_rate, ood_rate, epochs, patience, batch_size, lr, weight_decay, optimizer, schedule, warmup,
              label_smoothing, w_coarse, w_fine, no_gate, no_augment, erase_p, seed, limit, val_limit,
              val_share, procs, threads, device, out, resume, no_progress):
    """Train the hierarchical model and write a checkpoint each epoch: on the catalog's labelled products
    (--from-catalog --taxonomy NAME), or on Fashion-MNIST (--data fmnist|fmnist-mosaic)."""
    if not from_catalog:
        given = [p for p in CATALOG_ONLY if ctx.get_parameter_source(p) == ParameterSource.COMMANDLINE
                 and p != "taxonomy_name"]
        if given:
            raise StyletagError(f"--{given[0].replace('_', '-')} needs --from-catalog")
        return ctx.invoke(fmnist_train_cmd, data_name=data_name or "fmnist", source=source,
                          taxonomy=taxonomy_name or "fashion-mnist", backbone=backbone, pretrained=pretrained,
                          epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                          schedule=schedule, warmup=warmup, label_smoothing=label_smoothing, w_coarse=w_coarse,
                          w_fine=w_fine, input_size=input_size, no_augment=no_augment, seed=seed, limit=limit,
                          val_limit=val_limit, val_share=val_share, patience=patience, threads=threads, device=device,
                          out=out, resume=resume, init=init, erase_p=0.5 if erase_p is None else erase_p,
                          no_progress=no_progress, no_gate=no_gate)
    if data_name or source:
        raise StyletagError("--data and --source are for Fashion-MNIST; --from-catalog reads the catalog")
    if not taxonomy_name:
        raise StyletagError("--from-catalog needs --taxonomy NAME (see 'styletag taxonomy show')")
    _train_from_catalog(taxonomy_name=taxonomy_name, split=split, test_match=test_match, backbone=backbone,
                        pretrained=pretrained, init=init, channels=channels, input_size=input_size,
                        representation=representation, fit=fit, foreground_crop=foreground_crop, margin=margin,
                        outliers=outliers, val_outliers=val_outliers, oe_weight=oe_weight, review_rate=review_rate,
                        ood_rate=ood_rate, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, optimizer=optimizer, schedule=schedule, warmup=warmup,
                        label_smoothing=label_smoothing, w_coarse=w_coarse, w_fine=w_fine, no_augment=no_augment,
                        erase_p=0.25 if erase_p is None else erase_p, seed=seed, limit=limit, val_limit=val_limit,
                        procs=procs, threads=threads, device=device, out=out, resume=resume, no_progress=no_progress,
                        no_gate=no_gate)


def _check_paths(out: Path, resume: Path | None, init: Path | None) -> None:
    if not str(out).endswith(".safetensors"):
        raise StyletagError(f"--out must end in .safetensors, not {out}")
    if resume is not None and not resume.is_file():
        raise StyletagError(f"--resume checkpoint {resume} not found")
    if init is not None and not init.is_file():
        raise StyletagError(f"--init checkpoint {init} not found")


def _train_from_catalog(*, taxonomy_name, split, test_match, backbone, pretrained, init, channels, input_size,
                        representation, fit, foreground_crop, margin, outliers, val_outliers, oe_weight, review_rate,
                        ood_rate, epochs, patience, batch_size, lr, weight_decay, optimizer, schedule, warmup,
                        label_smoothing, w_coarse, w_fine, no_gate, no_augment, erase_p, seed, limit, val_limit, procs,
                        threads, device, out, resume, no_progress) -> None:
    import numpy as np

    from catalog.settings import Settings, redact_url
    from model.data import ArraySet
    from model.net import BACKBONES, check_pretrained
    from model.outliers import TRAIN_FAMILIES
    from model.train import TrainConfig, train
    from worker.training import SplitRule, decode_images, generated_outliers, load_catalog_set, model_taxonomy

    _check_paths(out, resume, init)
    if backbone not in BACKBONES:
        raise StyletagError(f"unknown backbone {backbone!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    if pretrained:
        check_pretrained(backbone, pretrained)
    rule = SplitRule.parse(split, test_match)
    spec = _spec(channels, input_size, representation, fit, foreground_crop, margin, backbone)
    settings = Settings.from_env()
    progress = _progress(no_progress)
    t0 = time.time()
    tax = model_taxonomy(settings, taxonomy_name)
    data = load_catalog_set(settings, tax, rule)
    counts = data.counts()
    click.echo(f"catalog {redact_url(settings.database_url)}, taxonomy {tax.name}: {len(data)} labelled products "
               f"(train {counts['train']}, val {counts['val']}, test {counts['test']}, never read here)"
               + (f"; skipped {data.skipped}" if data.skipped else ""))
    if counts["train"] == 0:
        raise StyletagError("the split puts no product in train; check --split and --test-match")
    use = np.concatenate([data.index("train")[:limit] if limit else data.index("train"), data.index("val")])
    images, ok, reasons, _ = decode_images(settings, [data.uris[i] for i in use], [data.versions[i] for i in use], spec,
                                        procs=procs, progress=progress)
    if reasons:
        click.echo(f"skipped {sum(reasons.values())} images that could not be read or decoded: {dict(reasons)}")
    is_train = np.isin(use, data.index("train"))
    tr, va = use[is_train & ok], use[~is_train & ok]
    pos = {int(j): k for k, j in enumerate(use)}
    train_set = ArraySet(images[[pos[int(j)] for j in tr]], data.coarse[tr], data.fine[tr])
    val_set = ArraySet(images[[pos[int(j)] for j in va]], data.coarse[va], data.fine[va]) if len(va) else None
    del images
    if val_set is None:
        click.echo("warning: no validation products: no early stopping, temperature or review threshold")
    for line in small_data_warnings(len(train_set), 0 if val_set is None else len(val_set), batch_size):
        click.echo(line)
    mean, std = _norm(spec, train_set.images)
    spec_d = {**spec.to_dict(), "mean": list(mean), "std": list(std)}
    out_train = out_val = None
    if oe_weight > 0 and outliers > 0:
        out_train, _, _ = generated_outliers(settings, spec, outliers, TRAIN_FAMILIES, seed=1, procs=procs,
                                          progress=progress)
    if val_set is not None and val_outliers > 0:
        out_val, _, _ = generated_outliers(settings, spec, val_outliers, TRAIN_FAMILIES, seed=2, procs=procs,
                                        progress=progress)
    pad_value = {"lab-delta": (0, 128, 128), "distance": (0,) * spec.channels}.get(spec.representation)
    cfg = TrainConfig(backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      optimizer=optimizer, schedule=schedule, warmup=warmup, label_smoothing=label_smoothing,
                      w_coarse=w_coarse, w_fine=w_fine, seed=seed, input_size=spec.input_size, channels=spec.channels,
                      mean=tuple(mean), std=tuple(std), pretrained=pretrained or False, augment=not no_augment,
                      erase_p=erase_p, device=device, threads=threads, out=str(out),
                      resume=str(resume) if resume else None, init=str(init) if init else None, val_limit=val_limit,
                      preprocess=spec_d, photo_augment=True, pad_value=pad_value, oe_weight=oe_weight,
                      patience=patience, review_rate=review_rate, ood_rate=ood_rate,
                      init_rule="first" if spec.representation in ("lab-delta", "distance") else "mean",
                      gate=not no_gate)
    desc = {"dataset": "catalog", "database": redact_url(settings.database_url), "taxonomy": tax.name,
            "split": rule.to_dict(), "counts": counts, "train_items": len(train_set),
            "val_items": len(val_set) if val_set is not None else 0, "skipped": data.skipped,
            "unreadable": dict(reasons),
            "outliers": {"train": 0 if out_train is None else len(out_train),
                         "val": 0 if out_val is None else len(out_val), "families": list(TRAIN_FAMILIES),
                         "seeds": {"train": 1, "val": 2}}}
    click.echo(f"data ready in {time.time() - t0:.0f}s: {len(train_set)} train, {desc['val_items']} val, "
               f"{desc['outliers']['train']} + {desc['outliers']['val']} generated non-garments; {spec_d}")
    t1 = time.time()
    _, meta = train(cfg, tax, train_set, val_set, outliers=out_train, val_outliers=out_val,
                    command=_command_line(), data_desc=desc, progress=progress, log=click.echo)
    click.echo(f"wrote {out} (model_version {meta['model_version']}) in {time.time() - t1:.0f}s of training")


MIN_VAL_ITEMS = 500  # below this, a temperature and thresholds fitted on validation are mostly noise
MIN_STEPS_PER_EPOCH = 20


def small_data_warnings(train_items: int, val_items: int, batch_size: int) -> list[str]:
    """One-line warnings for a catalog too small for the defaults: a validation split too small to fit the
    temperature and thresholds on, and batches so large that an epoch is a step or two."""
    out = []
    if 0 < val_items < MIN_VAL_ITEMS:
        out.append(f"warning: {val_items} validation products: the temperature, review threshold and early stopping "
                   f"fitted on so few are unreliable (aim for {MIN_VAL_ITEMS} or more; --split gives validation a "
                   "larger share)")
    steps = -(-train_items // batch_size) if train_items else 0
    if 0 < steps < MIN_STEPS_PER_EPOCH:
        suggest = max(8, 1 << max(0, (train_items // MIN_STEPS_PER_EPOCH).bit_length() - 1))
        out.append(f"warning: {train_items} training products in batches of {batch_size}: {steps} optimizer "
                   f"step(s) per epoch; --batch-size {suggest} learns more per epoch")
    return out


# --------------------------------------------------------------------------- eval


@click.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True)
@click.option("--from-catalog", is_flag=True, help="Evaluate on the catalog's test split (the checkpoint's rule).")
@click.option("--taxonomy", "taxonomy_name", default=None, help="Default: the checkpoint's taxonomy.")
@click.option("--split", "split_name", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--split-rule", default=None, help="Override the checkpoint's percentages, e.g. 80/10/10.")
@click.option("--test-match", default=None, metavar="GLOB", help="Override the checkpoint's test SKU glob.")
@click.option("--outliers", type=int, default=2000, show_default=True,
              help="Generated non-garments per family set (training families with unseen seeds, and held-out "
                   "families).")
@click.option("--colour/--no-colour", default=True, show_default=True,
              help="Colour accuracy: the catalog's colour truth vs model.colour.dominant_colours.")
@click.option("--robust-fmnist", type=int, default=0, show_default=True,
              help="Also the first N Fashion-MNIST test items rendered by a different renderer (ROBUST_STYLE).")
@click.option("--limit", type=int, default=None, help="Evaluate the first N products of the split only.")
@click.option("--source", type=click.Path(path_type=Path), default=None, help="Fashion-MNIST IDX files.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--decoding", type=click.Choice(["consistent", "independent", "fine-only"]), default="consistent",
              show_default=True)
@click.option("--procs", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), default=None, help="Also write the JSON here.")
@click.option("--plots", type=click.Path(path_type=Path), default=None, help="Write confusion-matrix PNGs here.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
def eval_cmd(ctx, checkpoint, from_catalog, taxonomy_name, split_name, split_rule, test_match, outliers, colour,
             robust_fmnist, limit, source, batch_size, device, decoding, procs, as_json, out_json, plots, no_progress):
    """Evaluate a checkpoint: on the test split of a catalog (--from-catalog), else on the Fashion-MNIST test
    split it was trained for."""
    if not from_catalog:
        return ctx.invoke(fmnist_eval_cmd, checkpoint=checkpoint, source=source, limit=limit, batch_size=batch_size,
                          device=device, decoding=decoding, as_json=as_json, plots=plots)
    from worker.training_eval import evaluate_from_catalog

    report = evaluate_from_catalog(checkpoint, taxonomy_name=taxonomy_name, split_name=split_name,
                                   split_rule=split_rule, test_match=test_match, outliers=outliers, colour=colour,
                                   robust_fmnist=robust_fmnist, limit=limit, source=source, batch_size=batch_size,
                                   device=device, decoding=decoding, procs=procs, plots=plots,
                                   progress=_progress(no_progress), command=_command_line())
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=1))
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    from worker.training_eval import print_report

    print_report(report, click.echo)


# --------------------------------------------------------------------------- calibrate


@click.command("calibrate")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True)
@click.option("--from-catalog", is_flag=True, required=True,
              help="Fit on the catalog's validation split (the checkpoint's rule). Required: the only source.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The new checkpoint.")
@click.option("--taxonomy", "taxonomy_name", default=None, help="Default: the checkpoint's taxonomy.")
@click.option("--split-rule", default=None, help="Override the checkpoint's percentages, e.g. 80/10/10.")
@click.option("--test-match", default=None, metavar="GLOB", help="Override the checkpoint's test SKU glob.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--procs", type=int, default=2, show_default=True)
@click.option("--no-progress", is_flag=True)
def calibrate_cmd(checkpoint, from_catalog, out, taxonomy_name, split_rule, test_match, batch_size, device, procs,
                  no_progress):
    """Fit a checkpoint's score map (isotonic, on the catalog's validation split) and write it as a new
    checkpoint: same weights, temperatures and review thresholds; the served scores' reliability fixed."""
    from worker.recalibration import recalibrate_from_catalog

    if out.resolve() == checkpoint.resolve():
        raise click.UsageError("--out must differ from --checkpoint (a registered model's file never changes)")
    r = recalibrate_from_catalog(checkpoint, out, taxonomy_name=taxonomy_name, split_rule=split_rule,
                                 test_match=test_match, procs=procs, batch_size=batch_size, device=device,
                                 progress=_progress(no_progress), command=_command_line())
    click.echo(f"wrote {out} (model_version {r['model_version']}, from {r['parent']}): score map fitted on "
               f"{r['n']} validation products in {r['seconds']:.0f}s")
