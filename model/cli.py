"""``styletag train`` and ``styletag eval`` (click commands; the main group in worker.cli adds them).

Also runnable on its own: ``python -m model.cli train ...`` is the same command.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from .errors import DatasetMissing, ModelError

DATASETS = ("fmnist", "fmnist-mosaic")


def _command_line() -> str:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a in ("train", "eval"):
            argv = argv[i:]
            break
    return "styletag " + shlex.join(argv)


def load_dataset(name: str, split: str, taxonomy, source=None, limit: int | None = None, seed: int = 0,
                 val_share: float = 0.1):
    """The named dataset as an ArraySet; ``split``: train | val (held out of the official training split by
    an index hash, ``val_share`` of it) | test (the official test split). ``fmnist-mosaic``: 2x2 mosaics,
    20k train / 4k val / 4k test."""
    from .data import fmnist_dataset, fmnist_split, mosaic_dataset

    if name == "fmnist":
        return fmnist_dataset(split, taxonomy, source, limit, val_share)
    if name == "fmnist-mosaic":
        images, labels = fmnist_split(split, source, val_share)  # FashionMNISTMissing is a DatasetMissing
        n = limit or (20_000 if split == "train" else 4_000)
        return mosaic_dataset(images, labels, taxonomy, n, seed=seed + {"train": 0, "test": 1, "val": 2}[split])
    raise DatasetMissing(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")


@click.command("train")
@click.option("--data", "data_name", type=click.Choice(DATASETS), default="fmnist", show_default=True)
@click.option("--source", type=click.Path(path_type=Path), default=None, help="Directory of the IDX files.")
@click.option("--taxonomy", default="fashion-mnist", show_default=True, help="Shipped name or JSON path.")
@click.option("--backbone", default="resnet-small", show_default=True)
@click.option("--pretrained", default=None, is_flag=False, flag_value="imagenet", metavar="imagenet|PATH",
              help="Start the backbone from torchvision's ImageNet weights (its cache, TORCH_HOME; downloaded once "
                   "where there is a network) or from a local weights file.")
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True)
@click.option("--warmup", type=float, default=0.15, show_default=True, help="Share of steps warming up.")
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--w-coarse", type=float, default=1.0, show_default=True, help="Coarse loss weight (0: flat fine-only).")
@click.option("--w-fine", type=float, default=1.0, show_default=True)
@click.option("--no-gate", is_flag=True, help="Ablation: no gate; the fine head reads the features directly.")
@click.option("--input-size", type=int, default=None, help="Default: 28 for small backbones, else 32.")
@click.option("--no-augment", is_flag=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N training items.")
@click.option("--val-limit", type=int, default=None, help="Per-epoch validation on the first N validation items.")
@click.option("--val-share", type=click.FloatRange(0, 0.5), default=0.1, show_default=True,
              help="Share of the training split held out for validation (early stopping, temperature, review "
                   "threshold); 0: none. The test split is never used in training.")
@click.option("--patience", type=int, default=0, show_default=True,
              help="Stop after N epochs without a better validation score (0: run every epoch).")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint path (.safetensors).")
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Continue an interrupted run.")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start from this checkpoint's weights with a fresh optimizer and schedule (warm restart).")
@click.option("--erase-p", type=float, default=0.5, show_default=True, help="Random-erasing probability.")
@click.option("--no-progress", is_flag=True)
def train_cmd(data_name, source, taxonomy, backbone, pretrained, epochs, batch_size, lr, weight_decay, optimizer,
              schedule, warmup, label_smoothing, w_coarse, w_fine, no_gate, input_size, no_augment, seed, limit,
              val_limit, val_share, patience, threads, device, out, resume, init, erase_p, no_progress):
    """Train the hierarchical model and write a checkpoint each epoch."""
    from .net import BACKBONES, MIN_INPUT_SIZE
    from .taxonomy import TaxonomyError, load_taxonomy
    from .train import TrainConfig, train

    try:
        tax = load_taxonomy(taxonomy)
    except TaxonomyError as exc:
        raise ModelError(str(exc)) from None
    if backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {backbone!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    if pretrained:
        from .net import check_pretrained

        check_pretrained(backbone, pretrained)
    if resume is not None and not resume.is_file():
        raise ModelError(f"--resume checkpoint {resume} not found")
    if init is not None and not init.is_file():
        raise ModelError(f"--init checkpoint {init} not found")
    if not str(out).endswith(".safetensors"):
        raise ModelError(f"--out must end in .safetensors, not {out}")
    size = input_size or max(28 * (2 if data_name == "fmnist-mosaic" else 1), MIN_INPUT_SIZE[backbone])
    from .data import FMNIST_MEAN, FMNIST_STD

    train_set = load_dataset(data_name, "train", tax, source, limit, seed, val_share)
    val_set = load_dataset(data_name, "val", tax, source, None, seed, val_share) if val_share > 0 else None
    cfg = TrainConfig(backbone=backbone, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      optimizer=optimizer, schedule=schedule, warmup=warmup, label_smoothing=label_smoothing, w_coarse=w_coarse,
                      w_fine=w_fine, seed=seed, input_size=size, channels=1, mean=FMNIST_MEAN, std=FMNIST_STD,
                      pretrained=pretrained or False, augment=not no_augment, device=device, threads=threads,
                      out=str(out), resume=str(resume) if resume else None, val_limit=val_limit,
                      init=str(init) if init else None, erase_p=erase_p, patience=patience, gate=not no_gate)
    desc = {"dataset": data_name, "source": str(source or "/usr/share/datasets/fashion-mnist"),
            "train_items": len(train_set), "val_items": len(val_set) if val_set is not None else 0,
            "val_split": f"{val_share:.0%} of the training split (index hash, model.data.holdout_mask)",
            "test_split": "the official test split (styletag eval)"}
    t0 = time.time()
    _, meta = train(cfg, tax, train_set, val_set, command=_command_line(), data_desc=desc,
                    progress=not no_progress, log=click.echo)
    click.echo(f"wrote {out} (model_version {meta['model_version']}) in {time.time() - t0:.0f}s")


@click.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True)
@click.option("--source", type=click.Path(path_type=Path), default=None, help="Directory of the IDX files.")
@click.option("--limit", type=int, default=None, help="Evaluate the first N test items only.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--decoding", type=click.Choice(["consistent", "independent", "fine-only"]), default="consistent",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--plots", type=click.Path(path_type=Path), default=None, help="Write confusion-matrix PNGs here.")
def eval_cmd(checkpoint, source, limit, batch_size, device, decoding, as_json, plots):
    """Evaluate a checkpoint on the test split of the dataset it was trained on."""
    from .evaluate import collect_logits, compute_metrics, summary
    from .predictor import load_model

    model, meta, tax, dev = load_model(checkpoint, device)
    data_name = (meta.get("data") or {}).get("dataset", "fmnist")
    test = load_dataset(data_name, "test", tax, source, limit, (meta.get("config") or {}).get("seed", 0))
    t0 = time.time()
    logits = collect_logits(model, test, mean=meta["mean"], std=meta["std"], input_size=meta["input_size"],
                            batch_size=batch_size, device=dev, channels=int(meta["channels"]))
    m = compute_metrics(tax, logits, decoding)
    seconds = time.time() - t0
    written = []
    if plots is not None and not tax.multi_label:
        from .plots import plot_confusion

        for level, names in (("coarse", tax.coarse.labels), ("fine", tax.fine.labels)):
            written.append(str(plot_confusion(m[level]["confusion"], names, plots / f"confusion-{level}.png",
                                              f"{level} ({m[level]['top1']:.2%} top-1)")))
    if as_json:
        out = {"checkpoint": str(checkpoint), "model_version": meta["model_version"], "dataset": data_name,
               **summary(m), "seconds": round(seconds, 2)}
        if not tax.multi_label:
            out["per_class"] = {"coarse": m["coarse"]["per_class"], "fine": m["fine"]["per_class"]}
        if written:
            out["plots"] = written
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"checkpoint {checkpoint} (model_version {meta['model_version']}), {data_name} test, n={m['n']}")
    for k, v in summary(m).items():
        if isinstance(v, float):
            click.echo(f"  {k:18s} {v:.4f}")
    if not tax.multi_label:
        for level in ("coarse", "fine"):
            click.echo(f"  {level} per class (precision / recall):")
            for name, pc in m[level]["per_class"].items():
                click.echo(f"    {name:14s} {pc['precision']:.3f} / {pc['recall']:.3f}  (n={pc['support']})")
    for w in written:
        click.echo(f"  wrote {w}")


train = train_cmd
evaluate = eval_cmd


@click.group()
def _main() -> None:
    """Stand-alone entry point: python -m model.cli train|eval ..."""


_main.add_command(train_cmd)
_main.add_command(eval_cmd)

if __name__ == "__main__":
    _main()
