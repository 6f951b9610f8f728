"""Training loop for the hierarchical net. Data comes in as a Dataset (see ``model.data``); the loop
never reads files itself, so the worker can pass a catalog-backed dataset.

Deterministic for a seed: the batch order and augmentation of epoch e come from a generator seeded with
(seed, e), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, load_optimizer, save_checkpoint, save_optimizer
from .consistency import parent_index
from .data import Augment, PhotoAugment, as_dataset, fit_channels, iterate_batches, n_batches, to_input
from .errors import ModelError
from .evaluate import collect_logits, compute_metrics, summary
from .losses import HierarchicalLoss
from .metadata import DEFAULT_THRESHOLDS
from .net import adapt_state, build_model, pick_device
from .taxonomy import Taxonomy


@dataclass
class TrainConfig:
    backbone: str = "resnet-small"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd
    schedule: str = "onecycle"  # onecycle | cosine
    warmup: float = 0.15  # share of steps warming up (onecycle); cosine uses min(0.05, warmup)
    label_smoothing: float = 0.1
    w_coarse: float = 1.0
    w_fine: float = 1.0
    dropout: float = 0.0
    gate: bool = True  # False: the fine head reads f directly (the ablation; metadata "gate": false)
    seed: int = 0
    input_size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    pretrained: bool | str = False  # True / "imagenet": torchvision's weights; a path: a local weights file
    augment: bool = True
    pad: int = 2
    erase_p: float = 0.5
    device: str | None = None
    threads: int | None = None
    channels_last: bool = True
    out: str | None = None
    resume: str | None = None
    init: str | None = None  # start from these weights with a fresh optimizer and schedule (warm restart)
    val_limit: int | None = None  # per-epoch validation on the first N items; the final one uses all
    thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    preprocess: dict | None = None  # model.preprocess.PreprocessSpec.to_dict(): recorded for serving
    photo_augment: bool = False  # PhotoAugment (scale, placement, contrast, blur, noise) instead of crop/flip
    pad_value: tuple[int, ...] | None = None  # the backdrop's value per channel (PhotoAugment's fill)
    oe_weight: float = 0.0  # outlier exposure: weight of the uniform-target loss on non-garment images
    patience: int = 0  # early stopping: stop after this many epochs without a better validation score (0: off)
    init_rule: str = "sum"  # --init / local weights with 1 channel into a 3-channel stem: "first" or "mean"
    review_rate: float = 0.04  # share of validation garments under the review threshold
    ood_rate: float = 0.01  # share of validation garments under the out-of-distribution threshold
    calibrate: bool = True  # fit temperature and review thresholds on validation at the end


def lr_at(step: int, total: int, base: float, schedule: str, warmup: float) -> float:
    """One-cycle: cosine ramp from base/25 up to base over ``warmup`` of the steps, cosine down to base/1e4.
    Cosine: short linear warm-up then cosine to 0."""
    t = step / max(total, 1)
    if schedule == "onecycle":
        if t < warmup:
            lo = base / 25
            return lo + (base - lo) * (1 - math.cos(math.pi * t / warmup)) / 2
        u = (t - warmup) / max(1 - warmup, 1e-8)
        lo = base / 1e4
        return lo + (base - lo) * (1 + math.cos(math.pi * u)) / 2
    if schedule == "cosine":
        w = min(0.05, warmup)
        if t < w:
            return base * (t / w)
        return base * (1 + math.cos(math.pi * (t - w) / max(1 - w, 1e-8))) / 2
    raise ModelError(f"unknown schedule {schedule!r}; use onecycle or cosine")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    raise ModelError(f"unknown optimizer {cfg.optimizer!r}; use adamw or sgd")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def base_meta(cfg: TrainConfig, taxonomy: Taxonomy) -> dict:
    extra = {"preprocess": {**cfg.preprocess, "mean": list(cfg.mean), "std": list(cfg.std),
                            "channels": cfg.channels, "input_size": cfg.input_size}} if cfg.preprocess else {}
    return {
        **extra,
        "taxonomy": taxonomy.to_dict(),
        "backbone": cfg.backbone,
        "input_size": cfg.input_size,
        "channels": cfg.channels,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "thresholds": dict(cfg.thresholds),
        "format": "styletag-checkpoint/1",
        **({} if cfg.gate else {"gate": False}),  # absent means gated: gated checkpoints hash as before
    }


def train(
    cfg: TrainConfig,
    taxonomy: Taxonomy,
    train_data,
    val_data=None,
    *,
    outliers=None,
    val_outliers=None,
    command: str = "",
    data_desc: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, dict]:
    """Train; write a checkpoint to ``cfg.out`` after every epoch. Returns (model, final metadata).

    ``outliers`` (uint8 non-garment images, preprocessed like the garments) ride along in every batch for
    outlier exposure when ``cfg.oe_weight`` > 0; ``val_outliers`` help choose the review score. With
    ``val_data``, the epoch with the best validation score is kept (``<out>.best.safetensors``), training
    stops early after ``cfg.patience`` epochs without progress, and the temperature and review thresholds
    are fitted on validation (``cfg.calibrate``). The test split never enters this function."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    train_data = as_dataset(train_data)
    val_data = as_dataset(val_data) if val_data is not None else None
    if len(train_data) == 0:
        raise ModelError("the training set is empty")
    model = build_model(
        cfg.backbone, len(taxonomy.coarse.labels), len(taxonomy.fine.labels), cfg.channels,
        False if cfg.resume else cfg.pretrained, cfg.dropout, cfg.gate,
    ).to(device)
    channels_last = cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    loss_fn = HierarchicalLoss(taxonomy, cfg.w_coarse, cfg.w_fine, cfg.label_smoothing).to(device)
    aug = Augment(pad=cfg.pad if cfg.augment else 0, flip=cfg.augment, erase_p=cfg.erase_p if cfg.augment else 0.0)
    photo_aug = PhotoAugment(pad_value=cfg.pad_value, erase_p=cfg.erase_p) if cfg.photo_augment else None
    outliers = _outlier_array(outliers, cfg.oe_weight)
    mean_t = torch.tensor(cfg.mean, device=device)
    std_t = torch.tensor(cfg.std, device=device)

    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    parent_meta = None
    if cfg.init and not cfg.resume:
        state, parent_meta = load_checkpoint(cfg.init)
        if parent_meta.get("backbone") != cfg.backbone:
            raise ModelError(f"--init checkpoint has backbone {parent_meta.get('backbone')!r}, not {cfg.backbone!r}")
        loadable, skipped = adapt_state(model.state_dict(), state, cfg.init_rule)
        model.load_state_dict(loadable, strict=False)
        fresh = sorted(set(model.state_dict()) - set(loadable))
        log(f"initialised from {cfg.init} (model_version {parent_meta['model_version']})"
            + (f"; fresh: {', '.join(fresh)}" if fresh else "") + (f"; not used: {', '.join(skipped)}" if skipped else ""))
    if cfg.resume:
        state, meta = load_checkpoint(cfg.resume)
        if meta.get("backbone") != cfg.backbone:
            raise ModelError(f"--resume checkpoint has backbone {meta.get('backbone')!r}, not {cfg.backbone!r}")
        if meta.get("gate", True) != cfg.gate:
            gated = meta.get("gate", True)
            raise ModelError(f"--resume checkpoint was trained {'with' if gated else 'without'} the gate; "
                             f"{'drop' if gated else 'pass'} --no-gate")
        model.load_state_dict(state)
        load_optimizer(cfg.resume, opt)
        start_epoch = int(meta.get("train", {}).get("epoch", 0))
        history = list(meta.get("train", {}).get("history", []))
        log(f"resumed from {cfg.resume} at epoch {start_epoch}")

    spe = n_batches(train_data, cfg.batch_size)
    total_steps = cfg.epochs * spe
    parent = parent_index(taxonomy.parents, device) if not taxonomy.multi_label else None
    meta = base_meta(cfg, taxonomy)
    meta.update(command=command, data=data_desc or {}, config=_jsonable(asdict(cfg)))
    best_path = Path(cfg.out).with_name(Path(cfg.out).name.removesuffix(".safetensors") + ".best.safetensors") \
        if cfg.out else None
    best = _best_so_far(history)
    stale = _epochs_since_best(history)
    if parent_meta is not None:  # a warm restart records the run it started from
        meta["parent"] = {k: parent_meta.get(k) for k in ("model_version", "command", "trained_at", "metrics", "parent")}
    elif cfg.resume:
        _, resumed_meta = load_checkpoint(cfg.resume)
        if "parent" in resumed_meta:
            meta["parent"] = resumed_meta["parent"]
    val_small = val_data.subset(cfg.val_limit) if (val_data is not None and hasattr(val_data, "subset")) else val_data

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        g = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + epoch)
        g_dev = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + epoch)
        t0 = time.time()
        run_loss = run_correct = run_n = 0.0
        bar = tqdm(iterate_batches(train_data, cfg.batch_size, shuffle=True, generator=g), total=spe,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        n_out = _outliers_per_batch(outliers, len(train_data), cfg.batch_size)
        out_order = torch.randperm(len(outliers), generator=g).numpy() if n_out else None
        for i, (x, ct, ft) in enumerate(bar):
            step = epoch * spe + i
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup)
            n_g = len(x)
            if n_out:
                pick = out_order[(np.arange(n_out) + i * n_out) % len(outliers)]
                x = torch.cat([fit_channels(x, cfg.channels), fit_channels(torch.from_numpy(outliers[np.sort(pick)]),
                                                                           cfg.channels)])
            x = fit_channels(x.to(device, non_blocking=True), cfg.channels)
            ct, ft = ct.to(device, non_blocking=True), ft.to(device, non_blocking=True)
            if cfg.augment:
                x = photo_aug.photo(x, g_dev) if photo_aug is not None else aug.crop_flip(x, g_dev)
            xin = to_input(x, mean_t, std_t, cfg.input_size, channels_last)
            if cfg.augment:
                xin = (photo_aug or aug).erase(xin, g_dev)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                c_log, f_log = model(xin)
                loss, _parts = loss_fn(c_log[:n_g], f_log[:n_g], ct, ft)
                if n_out:
                    loss = loss + cfg.oe_weight * outlier_loss(c_log[n_g:], f_log[n_g:], taxonomy.multi_label)
                c_log, f_log = c_log[:n_g], f_log[:n_g]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                bs = n_g
                run_loss += float(loss) * bs
                if taxonomy.multi_label:
                    correct = ((torch.sigmoid(f_log.float()) >= 0.5) == (ft >= 0.5)).all(1).sum()
                else:
                    correct = (f_log.argmax(1) == ft).sum()
                run_correct += float(correct)
                run_n += bs
            if i % 10 == 0:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{run_correct / run_n:.3f}")
        bar.close()
        row = {"epoch": epoch + 1, "train_loss": run_loss / run_n, "train_acc": run_correct / run_n,
               "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
        if val_small is not None:
            logits = collect_logits(model, val_small, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
                                    batch_size=512, device=device, channels_last=channels_last,
                                    channels=cfg.channels)
            row.update({f"val_{k}": v for k, v in summary(compute_metrics(taxonomy, logits)).items()
                        if isinstance(v, float)})
        history.append(row)
        log("epoch " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        score = _val_score(row)
        improved = score is not None and (best is None or score > best[1])
        if improved:
            best, stale = (epoch + 1, score), 0
        elif score is not None:
            stale += 1
        if cfg.out:
            meta.update(trained_at=_now(), train={"epoch": epoch + 1, "epochs": cfg.epochs, "history": history,
                                                  "best_epoch": best[0] if best else None})
            save_checkpoint(cfg.out, model, meta)
            save_optimizer(cfg.out, opt)
            if improved and best_path is not None:
                save_checkpoint(best_path, model, meta)
        if cfg.patience and stale >= cfg.patience:
            log(f"early stop: no better validation score for {stale} epochs (best: epoch {best[0]})")
            break
    del parent
    if best is not None and best_path is not None and best_path.is_file() and best[0] != history[-1]["epoch"]:
        state, _ = load_checkpoint(best_path)
        model.load_state_dict(state)
        log(f"kept the best validation epoch: {best[0]}")

    final_metrics: dict = {}
    if val_data is not None:
        logits = collect_logits(model, val_data, mean=cfg.mean, std=cfg.std, input_size=cfg.input_size,
                                batch_size=512, device=device, channels_last=channels_last,
                                channels=cfg.channels)
        final_metrics = summary(compute_metrics(taxonomy, logits))
        log("final (validation) " + " ".join(f"{k}={v}" for k, v in final_metrics.items()))
        if cfg.calibrate and len(val_data):
            fitted = calibrate(model, taxonomy, cfg, logits, val_data, val_outliers, device, channels_last)
            fit_report = fitted.pop("fit")
            meta.update(fitted)
            final_metrics["calibration"] = fit_report
            log(f"calibration (validation): temperature {fitted['temperature']}, review score "
                f"{fitted['review_score']['kind']}, review threshold {fitted['review_threshold']:.4f}, "
                f"ood threshold {fitted['ood_threshold']:.4f}")
    meta.update(trained_at=_now(), metrics=final_metrics,
                train={"epoch": history[-1]["epoch"] if history else 0, "epochs": cfg.epochs, "history": history,
                       "best_epoch": best[0] if best else None})
    if cfg.out:
        meta["model_version"] = save_checkpoint(cfg.out, model, meta)
        try:
            from .plots import plot_history

            plot_history(history, Path(cfg.out).with_suffix(".curves.png"))
        except Exception as exc:  # a plot must never lose a trained model
            log(f"warning: could not plot training curves: {exc}")
    return model, meta


def outlier_loss(coarse_logits: torch.Tensor, fine_logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Outlier exposure (Hendrycks et al. 2019): a non-garment's target is the uniform distribution on both
    heads (single-label), or no label at all (multi-label: BCE towards 0)."""
    if multi_label:
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        return bce(coarse_logits.float(), torch.zeros_like(coarse_logits.float())) + \
            bce(fine_logits.float(), torch.zeros_like(fine_logits.float()))
    return -(torch.log_softmax(coarse_logits.float(), 1).mean(1).mean() + torch.log_softmax(fine_logits.float(), 1)
             .mean(1).mean())


def _outlier_array(outliers, weight: float) -> np.ndarray | None:
    if outliers is None or weight <= 0:
        return None
    arr = np.asarray(outliers, dtype=np.uint8)
    return arr if len(arr) else None


def _outliers_per_batch(outliers: np.ndarray | None, n_train: int, batch_size: int) -> int:
    """Outliers ride along in proportion to their share of the data (at least one a batch)."""
    if outliers is None:
        return 0
    return max(1, int(round(batch_size * len(outliers) / max(n_train, 1))))


def _val_score(row: dict) -> float | None:
    for key in ("val_fine_top1", "val_fine_map"):
        if isinstance(row.get(key), float):
            return row[key]
    return None


def _best_so_far(history: list[dict]) -> tuple[int, float] | None:
    scored = [(r["epoch"], _val_score(r)) for r in history if _val_score(r) is not None]
    return max(scored, key=lambda e: (e[1], -e[0])) if scored else None


def _epochs_since_best(history: list[dict]) -> int:
    best = _best_so_far(history)
    return 0 if best is None else history[-1]["epoch"] - best[0]


def calibrate(model, taxonomy: Taxonomy, cfg: TrainConfig, val_logits: dict, val_data, val_outliers, device,
              channels_last: bool) -> dict:
    """Temperature, review score and thresholds (and the frame rule, for backdrop-distance inputs), fitted
    on the validation garments and validation non-garments: ``model.calibration.fit_serving_calibration``."""
    from .calibration import fit_serving_calibration
    from .data import ArraySet

    parent = None if taxonomy.multi_label else np.array([p[0] for p in taxonomy.parents], dtype=np.int64)
    oc = of = None
    out_images = None
    if val_outliers is not None and len(val_outliers):
        out_images = np.asarray(val_outliers, dtype=np.uint8)
        dummy = np.zeros(len(out_images), np.int64)
        ol = collect_logits(model, ArraySet(out_images, dummy, dummy), mean=cfg.mean, std=cfg.std,
                            input_size=cfg.input_size, batch_size=512, device=device, channels_last=channels_last,
                            channels=cfg.channels)
        oc, of = ol["coarse_logits"], ol["fine_logits"]
    garment_images = None
    rep = (cfg.preprocess or {}).get("representation")
    if rep in ("distance", "lab-delta") and isinstance(val_data, ArraySet):
        garment_images = val_data.images
    else:
        out_images = None
    return fit_serving_calibration(val_logits["coarse_logits"], val_logits["fine_logits"], val_logits["coarse_t"],
                                   val_logits["fine_t"], parent, oc, of, review_rate=cfg.review_rate,
                                   ood_rate=cfg.ood_rate, garment_images=garment_images, outlier_images=out_images)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
