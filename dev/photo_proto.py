"""Prototype of the photo model: render a photo catalogue, preprocess it with candidate specs, train,
calibrate and measure. A development script (not part of the package); its numbers go into the design.

    python dev/photo_proto.py gen   [--out DIR] [--train N] [--test N] [--robust N] [--procs 2]
    python dev/photo_proto.py train DESIGN [--epochs E] [--limit N] [--out DIR]
    python dev/photo_proto.py eval  DESIGN [--out DIR]
    python dev/photo_proto.py bench [--out DIR]

Splits: train/val are rendered from the Fashion-MNIST *train* split, validation held out by an index hash
(never the test split); test and the "robust" test (a deliberately different renderer: other backdrop
tints, garment sizes 30-95 %, no shadow, stronger light changes, more rotation) from its *test* split.
Outliers: TRAIN_FAMILIES for training and validation, HELD_OUT_FAMILIES only for the test.
Each photo is JPEG-encoded (quality 75-95) and decoded through ``model.preprocess.decode_image``, exactly
as the worker will see it. Arrays are cached per design under ``--out`` (default /tmp/proto/data).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.fmnist import load_split  # noqa: E402
from model.outliers import HELD_OUT_FAMILIES, TRAIN_FAMILIES, render_outlier  # noqa: E402
from model.preprocess import PreprocessSpec, decode_image  # noqa: E402
from model.render import render_photo  # noqa: E402

MAX_PIXELS = 40_000_000
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
SPECS: dict[str, PreprocessSpec] = {
    # A: colour, whole photo, aspect kept, padded with the backdrop colour
    "A": PreprocessSpec(channels=3, input_size=64, fit="pad", foreground_crop=False, representation="as-is",
                        mean=(0.5,), std=(0.5,)),
    # B: grey distance from the backdrop, cropped to the garment: Fashion-MNIST's own look
    "B": PreprocessSpec(channels=1, input_size=28, fit="pad", foreground_crop=True, representation="distance",
                        mean=FMNIST_MEAN, std=FMNIST_STD, margin=0.0),
    # D: B's distance plus the lightness and chroma differences from the backdrop, cropped to the garment
    "D": PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
                        mean=(0.2860, 0.5, 0.5), std=(0.3530, 0.25, 0.25), margin=0.0),
    # C: colour as-is, cropped to the garment, small
    "C": PreprocessSpec(channels=3, input_size=32, fit="pad", foreground_crop=True, representation="as-is",
                        mean=(0.5,), std=(0.5,), margin=0.04),
}
ROBUST_STYLE = dict(
    backdrop_weights=(0.15, 0.2, 0.2, 0.45), pastel_saturation=(0.12, 0.35), backdrop_value=(0.72, 0.97),
    item_scale=(0.30, 0.95), shadow_p=0.0, lighting=0.2, rotation=15.0, gradient_p=0.7,
    gradient_strength=(0.05, 0.2), vignette_p=0.5, vignette_strength=(0.1, 0.3),
    aspects=((1, 1), (2, 3), (3, 2), (9, 16), (16, 9), (4, 5)),
)
SPLIT_CODE = {"train": 1, "test": 2, "robust": 3, "out-train": 4, "out-val": 5, "out-test": 6, "out-trainfam": 7}


def is_val(index: np.ndarray) -> np.ndarray:
    """Validation = 10 % of the Fashion-MNIST train split, chosen by a multiplicative hash of the index."""
    h = (np.asarray(index, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return (h % np.uint64(10)) == 0


def _encode(im, rng) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def _work(job):
    split, start, stop, designs = job
    images = None
    if split in ("train", "test", "robust"):
        images, _ = load_split("test" if split == "robust" else split)
    out = {d: [] for d in designs}
    colours, fams = [], []
    keep_jpeg = []
    for i in range(start, stop):
        rng = np.random.default_rng([SPLIT_CODE[split], i])
        if images is not None:
            style = ROBUST_STYLE if split == "robust" else {}
            p = render_photo(images[i], rng, **style)
            im, tag = p.image, "|".join(p.colours)
        else:
            fams_for = HELD_OUT_FAMILIES if split == "out-test" else TRAIN_FAMILIES
            o = render_outlier(rng, families=fams_for)
            im, tag = o.image, o.family
        data = _encode(im, rng)
        if split in ("test", "out-test") and i - start < 40:
            keep_jpeg.append(data)
        for d in designs:
            out[d].append(decode_image(data, SPECS[d], MAX_PIXELS))
        (colours if images is not None else fams).append(tag)
    return split, start, {d: np.stack(v) for d, v in out.items()}, colours or fams, keep_jpeg


def gen(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    designs = args.designs.split(",")
    sizes = {"train": args.train, "test": args.test, "robust": args.robust, "out-train": args.out_train,
             "out-val": args.out_val, "out-test": args.out_test, "out-trainfam": args.out_trainfam}
    jobs = []
    for split, n in sizes.items():
        if (out / f"{split}.json").is_file() or n == 0:
            continue
        jobs += [(split, s, min(s + 500, n), designs) for s in range(0, n, 500)]
    t0 = time.time()
    results: dict[str, list] = {}
    (out / "bench_jpeg").mkdir(exist_ok=True)
    with Pool(args.procs) as pool:
        for k, (split, start, arrays, tags, jpegs) in enumerate(pool.imap_unordered(_work, jobs)):
            results.setdefault(split, []).append((start, arrays, tags))
            for j, data in enumerate(jpegs):
                (out / "bench_jpeg" / f"{split}-{start + j:05d}.jpg").write_bytes(data)
            print(f"[gen] {k + 1}/{len(jobs)} chunks, {time.time() - t0:.0f} s", flush=True)
            n_split = math.ceil(sizes[split] / 500)
            if len(results[split]) == n_split:
                parts = sorted(results.pop(split), key=lambda r: r[0])
                for d in designs:
                    np.save(out / f"{split}.{d}.npy", np.concatenate([p[1][d] for p in parts]))
                tags_all = [t for p in parts for t in p[2]]
                (out / f"{split}.json").write_text(json.dumps({"n": len(tags_all), "tags": tags_all,
                                                                "seconds": time.time() - t0}))
    print(f"[gen] done in {time.time() - t0:.0f} s")


# --------------------------------------------------------------------------- training


def _labels(split: str, n: int) -> np.ndarray:
    _, labels = load_split("test" if split in ("test", "robust") else "train")
    return labels[:n].astype(np.int64)


def _tax():
    from model.taxonomy import load_taxonomy

    return load_taxonomy("fashion-mnist")


def _parent(tax) -> np.ndarray:
    return np.array([p[0] for p in tax.parents], dtype=np.int64)


def lr_at(step: int, total: int, base: float, warmup: float = 0.15) -> float:
    """One-cycle as model.train's: cosine up from base/25 over ``warmup``, cosine down to base/1e4."""
    t = step / max(total, 1)
    if t < warmup:
        lo = base / 25
        return lo + (base - lo) * (1 - math.cos(math.pi * t / warmup)) / 2
    u = (t - warmup) / max(1 - warmup, 1e-8)
    lo = base / 1e4
    return lo + (base - lo) * (1 + math.cos(math.pi * u)) / 2


def _norm(design: str, train_x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    spec = SPECS[design]
    if design in ("B", "D"):
        return spec.mean, spec.std
    sample = train_x[:: max(1, len(train_x) // 4000)].astype(np.float32) / 255.0
    axes = (0, 1, 2)
    return tuple(float(v) for v in sample.mean(axes)), tuple(float(v) for v in sample.std(axes))


def _init_from(model, path: str, channels: int, first_only: bool = False) -> None:
    import torch

    from model.checkpoint import load_checkpoint

    state, _ = load_checkpoint(path)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape and v.ndim == 4 and v.shape[1] == 1 and own[k].shape[1] == 3:
            if first_only:  # the grey model reads channel 0 (lab-delta's distance); the others start at zero
                state[k] = torch.cat([v, torch.zeros_like(v), torch.zeros_like(v)], 1)
            else:
                state[k] = v.repeat(1, 3, 1, 1) / 3  # grey stem -> RGB stem (same response to a grey picture)
    missing = model.load_state_dict(state, strict=False)
    print(f"[train] init from {path}: missing {missing.missing_keys}, unexpected {missing.unexpected_keys}")
    del torch


def train(args) -> None:
    import torch
    import torch.nn.functional as F

    from model.checkpoint import save_checkpoint
    from model.data import Augment, to_input
    from model.net import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    design = args.design
    spec = SPECS[design]
    tax = _tax()
    parent = torch.from_numpy(_parent(tax))
    x_all = np.load(data / f"train.{design}.npy")
    y_all = _labels("train", len(x_all))
    val = is_val(np.arange(len(x_all)))
    x_tr, y_tr = x_all[~val], y_all[~val]
    if args.limit:
        x_tr, y_tr = x_tr[: args.limit], y_tr[: args.limit]
    x_out = np.load(data / f"out-train.{design}.npy") if args.oe > 0 else np.zeros((0,) + x_tr.shape[1:], np.uint8)
    mean, std = _norm(design, x_tr)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    model = build_model(args.backbone, len(tax.coarse.labels), len(tax.fine.labels), spec.channels)
    if args.init:
        _init_from(model, args.init, spec.channels, first_only=spec.representation == "lab-delta")
    model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    pad = 2 if design == "B" else 0  # zero padding is the backdrop only in the distance representation
    aug = Augment(pad=pad, flip=True, erase_p=args.erase)
    bs = args.batch_size
    n_out_per = int(round(bs * len(x_out) / max(len(x_tr), 1))) if len(x_out) else 0
    spe = math.ceil(len(x_tr) / bs)
    total = spe * args.epochs
    history = []
    print(f"[train] {design} {args.backbone}: {len(x_tr)} garments + {len(x_out)} outliers ({n_out_per}/batch), "
          f"{args.epochs} epochs x {spe} steps; mean {mean} std {std}", flush=True)
    y_tr_t = torch.from_numpy(y_tr)
    for epoch in range(args.epochs):
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(x_tr), generator=g).numpy()
        out_order = torch.randperm(max(len(x_out), 1), generator=g).numpy()
        t0 = time.time()
        tot = correct = seen = 0.0
        for i in range(spe):
            for grp in opt.param_groups:
                grp["lr"] = lr_at(epoch * spe + i, total, args.lr)
            idx = np.sort(order[i * bs : (i + 1) * bs])
            xb = torch.from_numpy(x_tr[idx])
            ft = y_tr_t[idx]
            ct = parent[ft]
            n_g = len(idx)
            if n_out_per:
                oi = out_order[(np.arange(n_out_per) + i * n_out_per) % len(x_out)]
                xb = torch.cat([xb, torch.from_numpy(x_out[oi])])
            xb = aug.crop_flip(xb, g)
            xin = aug.erase(to_input(xb, mean_t, std_t, spec.input_size, True), g)
            c_log, f_log = model(xin)
            loss = F.cross_entropy(c_log[:n_g], ct, label_smoothing=0.1) + F.cross_entropy(f_log[:n_g], ft,
                                                                                           label_smoothing=0.1)
            if n_out_per:  # outlier exposure: a uniform target on both heads for non-garments
                lo_f = -F.log_softmax(f_log[n_g:], 1).mean(1).mean()
                lo_c = -F.log_softmax(c_log[n_g:], 1).mean(1).mean()
                loss = loss + args.oe * (lo_f + lo_c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * n_g
            correct += float((f_log[:n_g].argmax(1) == ft).sum())
            seen += n_g
            if i % 50 == 0:
                print(f"[train] epoch {epoch + 1} step {i}/{spe} loss {tot / seen:.3f} acc {correct / seen:.3f} "
                      f"{time.time() - t0:.0f} s", flush=True)
        secs = time.time() - t0
        vx = np.load(data / f"train.{design}.npy")[val]
        vl = _logits(model, vx, spec, mean, std)
        vacc = float((vl[1].argmax(1) == y_all[val]).mean())
        history.append({"epoch": epoch + 1, "seconds": secs, "train_loss": tot / seen, "train_acc": correct / seen,
                        "val_fine_top1_argmax": vacc, "images": int(seen + n_out_per * spe)})
        print(f"[train] epoch {epoch + 1}: {secs:.0f} s, loss {tot / seen:.3f}, val fine {vacc:.4f}", flush=True)
    ck = Path(args.ckpt) / f"{args.name or design}.safetensors"
    meta = {"taxonomy": tax.to_dict(), "backbone": args.backbone, "input_size": spec.input_size,
            "channels": spec.channels, "mean": list(mean), "std": list(std), "format": "styletag-checkpoint/1",
            "preprocess": {**spec.to_dict(), "mean": list(mean), "std": list(std)},
            "command": " ".join(sys.argv), "train": {"history": history}}
    save_checkpoint(ck, model, meta)
    print(f"[train] wrote {ck}")


def _logits(model, x: np.ndarray, spec: PreprocessSpec, mean, std, bs: int = 512):
    import torch

    from model.data import to_input

    model.eval()
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    cs, fs = [], []
    with torch.inference_mode():
        for s in range(0, len(x), bs):
            xin = to_input(torch.from_numpy(x[s : s + bs]), mean_t, std_t, spec.input_size, True)
            c, f = model(xin)
            cs.append(c.float().numpy())
            fs.append(f.float().numpy())
    return np.concatenate(cs), np.concatenate(fs)


# --------------------------------------------------------------------------- evaluation


def evaluate(args) -> None:
    import torch

    from model import calibration as cal
    from model.evaluate import compute_metrics
    from model.predictor import load_model

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ck = Path(args.ckpt) / f"{args.name or args.design}.safetensors"
    model, meta, tax, _ = load_model(ck, "cpu")
    model = model.to(memory_format=torch.channels_last)
    spec = PreprocessSpec.from_checkpoint_meta(meta)
    mean, std = meta["mean"], meta["std"]
    parent = _parent(tax)
    d = args.design

    def arr(split):
        return np.load(data / f"{split}.{d}.npy")

    x_train = arr("train")
    val = is_val(np.arange(len(x_train)))
    sets = {"val": (x_train[val], _labels("train", len(x_train))[val]),
            "test": (arr("test"), _labels("test", len(arr("test")))),
            "robust": (arr("robust"), _labels("robust", len(arr("robust"))))}
    del x_train
    outs = {k: arr(k) for k in ("out-val", "out-test", "out-trainfam")}
    fams = json.loads((data / "out-test.json").read_text())["tags"]
    logits = {k: _logits(model, x, spec, mean, std) for k, (x, _) in sets.items()}
    logits.update({k: _logits(model, x, spec, mean, std) for k, x in outs.items()})

    res: dict = {"design": d, "checkpoint": str(ck), "backbone": meta["backbone"], "preprocess": spec.to_dict(),
                 "train": meta.get("train", {})}
    for k in ("val", "test", "robust"):
        c, f = logits[k]
        y = sets[k][1]
        m = compute_metrics(tax, {"coarse_logits": c, "fine_logits": f, "coarse_t": parent[y], "fine_t": y})
        res[k] = {"fine_top1": m["fine_top1"], "coarse_top1": m["coarse_top1"], "consistency": m["consistency"],
                  "fine_recall": {n: round(v["recall"], 4) for n, v in m["fine"]["per_class"].items()},
                  "fine_confusion": m["fine"]["confusion"]}
    cv, fv = logits["val"]
    yv = sets["val"][1]
    t_f = cal.fit_temperature(fv, yv)
    t_c = cal.fit_temperature(cv, parent[yv])
    res["temperature"] = {"fine": t_f, "coarse": t_c}
    ct, ft = logits["test"]
    yt = sets["test"][1]
    # The consistent decoding multiplies two heads' evidence: one more temperature on the joint's log-probs
    # (fitted on validation) calibrates the scores that are actually served.
    joint_val = np.log(np.clip(cal.joint_fine_probs(cv, fv, parent), 1e-12, 1))
    t_j = cal.fit_temperature(joint_val, yv)
    res["temperature"]["joint"] = t_j
    joint_test = np.log(np.clip(cal.joint_fine_probs(ct, ft, parent), 1e-12, 1))
    for name, tj in {"raw": 1.0, "scaled": t_j}.items():
        p = cal.softmax(joint_test, tj)
        res[f"test_ece_{name}"] = cal.expected_calibration_error(p.max(1), p.argmax(1) == yt)
        res[f"test_nll_{name}"] = cal.nll(joint_test, yt, tj)
    p = cal.softmax(joint_test, t_j)
    res["reliability_test"] = cal.reliability_table(p.max(1), p.argmax(1) == yt, n_bins=10)
    for kind in ("msp", "energy", "max-logit"):
        def score(key, kind=kind):
            c, f = logits[key]
            return cal.review_scores(f, kind, coarse_logits=c, parent=parent, t_fine=t_f, t_coarse=t_c)
        thr = cal.fit_review_threshold(score("val"), 0.05)
        r = {"threshold": thr, "val_garments_flagged": cal.flag_rate(score("val"), thr),
             "val_outliers_flagged": cal.flag_rate(score("out-val"), thr)}
        for key in ("test", "robust"):
            r[f"{key}_garments_flagged"] = cal.flag_rate(score(key), thr)
        so = score("out-test")
        r["heldout_outliers_flagged"] = cal.flag_rate(so, thr)
        r["trainfam_outliers_flagged"] = cal.flag_rate(score("out-trainfam"), thr)
        r["auroc_test_vs_heldout"] = cal.auroc(score("test"), so)
        r["per_family"] = {f: cal.flag_rate(so[np.array(fams) == f], thr) for f in HELD_OUT_FAMILIES}
        res[f"review_{kind}"] = r
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name or d}.json").write_text(json.dumps(res, indent=1))
    short = {k: res[k] for k in ("temperature", "test_ece_raw", "test_ece_scaled")}
    for k in ("val", "test", "robust"):
        short[k] = {n: v for n, v in res[k].items() if n != "fine_confusion"}
    print(json.dumps(short, indent=1))
    for kind in ("msp", "energy", "max-logit"):
        r = res[f"review_{kind}"]
        print(kind, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "per_family"})
        print("   per family", {k: round(v, 3) for k, v in r["per_family"].items()})


# --------------------------------------------------------------------------- speed


def bench(args) -> None:
    import torch

    from model.net import build_model

    files = sorted((Path(args.data) / "bench_jpeg").glob("test-*.jpg"))[: args.n]
    blobs = [f.read_bytes() for f in files]
    sizes = [len(b) for b in blobs]
    res: dict = {"jpeg_files": len(blobs), "jpeg_kib_mean": sum(sizes) / len(sizes) / 1024,
                 "loadavg_before": os.getloadavg()}
    legacy = PreprocessSpec(channels=1, input_size=28)
    for name, spec in {"legacy28": legacy, **SPECS}.items():
        decode_image(blobs[0], spec, MAX_PIXELS)
        best = 0.0
        for _ in range(args.repeat):
            t = time.perf_counter()
            for b in blobs:
                decode_image(b, spec, MAX_PIXELS)
            best = max(best, len(blobs) / (time.perf_counter() - t))
        res[f"decode_{name}_per_core"] = best
        print(f"decode+preprocess {name}: {best:.0f} img/s on one core", flush=True)
    torch.set_num_threads(args.threads)
    for name, (backbone, spec) in {"A": ("resnet-small", SPECS["A"]), "A-tiny": ("resnet-tiny", SPECS["A"]),
                                   "B": ("resnet-small", SPECS["B"]), "D": ("resnet-small", SPECS["D"]),
                                   "C": ("resnet-small", SPECS["C"]), "B-wide": ("resnet-wide", SPECS["B"])}.items():
        m = build_model(backbone, 6, 10, spec.channels).eval().to(memory_format=torch.channels_last)
        x = torch.randn(256, spec.channels, spec.input_size, spec.input_size).contiguous(
            memory_format=torch.channels_last)
        best = 0.0
        with torch.inference_mode():
            m(x)
            for _ in range(args.repeat):
                t = time.perf_counter()
                m(x)
                best = max(best, 256 / (time.perf_counter() - t))
        res[f"model_{name}_bs256"] = best
        print(f"model {name} ({backbone}, {spec.channels}x{spec.input_size}px): {best:.0f} img/s, batch 256, "
              f"{args.threads} threads", flush=True)
        if args.train_steps:
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            yb = torch.randint(0, 6, (256,))
            times = []
            for _ in range(args.train_steps + 1):
                t = time.perf_counter()
                c, f = m(x)
                loss = torch.nn.functional.cross_entropy(c, yb) + torch.nn.functional.cross_entropy(f, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
            res[f"train_{name}_img_per_s"] = 256 / float(np.median(times[1:]))
            print(f"  training {name}: {res[f'train_{name}_img_per_s']:.0f} img/s (forward+backward+AdamW)",
                  flush=True)
    res["loadavg_after"] = os.getloadavg()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{int(time.time())}.json").write_text(json.dumps(res, indent=1))


def baseline(args) -> None:
    """The shipped Fashion-MNIST model on photos: today's legacy preprocessing (re-rendered test photos),
    and zero-shot on design B's arrays (no fine-tuning)."""
    import torch

    from model.evaluate import compute_metrics
    from model.predictor import load_model

    torch.set_num_threads(args.threads)
    model, meta, tax, _ = load_model(args.checkpoint, "cpu")
    parent = _parent(tax)
    images, labels = load_split("test")
    legacy = PreprocessSpec.from_checkpoint_meta(meta)
    xs = []
    for i in range(args.n):
        rng = np.random.default_rng([SPLIT_CODE["test"], i])
        p = render_photo(images[i], rng)
        xs.append(decode_image(_encode(p.image, rng), legacy, MAX_PIXELS))
    res = {}
    for name, x, y in [("legacy_on_photos", np.stack(xs), labels[: args.n].astype(np.int64)),
                       ("zero_shot_B_test", np.load(Path(args.data) / "test.B.npy"), _labels("test", 10**6)),
                       ("zero_shot_B_robust", np.load(Path(args.data) / "robust.B.npy"), _labels("robust", 10**6))]:
        y = y[: len(x)]
        spec = legacy if name.startswith("legacy") else SPECS["B"]
        c, f = _logits(model, x, spec, meta["mean"], meta["std"])
        m = compute_metrics(tax, {"coarse_logits": c, "fine_logits": f, "coarse_t": parent[y], "fine_t": y})
        res[name] = {"n": len(y), "fine_top1": m["fine_top1"], "coarse_top1": m["coarse_top1"]}
        print(name, res[name], flush=True)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--out", default="/tmp/proto/data")
    g.add_argument("--designs", default="A,B,C")
    g.add_argument("--train", type=int, default=60000)
    g.add_argument("--test", type=int, default=10000)
    g.add_argument("--robust", type=int, default=5000)
    g.add_argument("--out-train", type=int, default=6000)
    g.add_argument("--out-val", type=int, default=1000)
    g.add_argument("--out-test", type=int, default=2000)
    g.add_argument("--out-trainfam", type=int, default=1000)
    g.add_argument("--procs", type=int, default=2)
    t = sub.add_parser("train")
    t.add_argument("design", choices=list(SPECS))
    t.add_argument("--data", default="/tmp/proto/data")
    t.add_argument("--ckpt", default="/tmp/proto/ckpt")
    t.add_argument("--name", default="")
    t.add_argument("--backbone", default="resnet-small")
    t.add_argument("--init", default="")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--limit", type=int, default=0)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--oe", type=float, default=0.5)
    t.add_argument("--erase", type=float, default=0.25)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval")
    e.add_argument("design", choices=list(SPECS))
    e.add_argument("--data", default="/tmp/proto/data")
    e.add_argument("--ckpt", default="/tmp/proto/ckpt")
    e.add_argument("--results", default="/tmp/proto/results")
    e.add_argument("--name", default="")
    e.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("bench")
    b.add_argument("--data", default="/tmp/proto/data")
    b.add_argument("--results", default="/tmp/proto/results")
    b.add_argument("--n", type=int, default=200)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--train-steps", type=int, default=3)
    z = sub.add_parser("baseline")
    z.add_argument("--data", default="/tmp/proto/data")
    z.add_argument("--results", default="/tmp/proto/results")
    z.add_argument("--checkpoint", default="model/weights/fmnist-resnet-small.safetensors")
    z.add_argument("--n", type=int, default=1000)
    z.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "gen":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        gen(args)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "eval":
        evaluate(args)
    elif args.cmd == "bench":
        bench(args)
    elif args.cmd == "baseline":
        baseline(args)


if __name__ == "__main__":
    main()
