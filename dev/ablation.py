"""The ablation behind docs/model.md "Ablation: the seed's claim, measured": one small equal budget, five rows.

    python dev/ablation.py                               # the full budget: writes docs/results/ablation-fmnist.json
    python dev/ablation.py --limit 2000 --epochs 1       # a smoke run (results under --work unless --out is given)

Budget (every model): resnet-tiny, the first ``--limit`` (30,000) Fashion-MNIST training images, ``--epochs`` (3)
epochs, batch 128, AdamW 3e-3 one-cycle, label smoothing 0.1, the default augmentation and validation hold-out,
seed 0. Three networks are trained with ``styletag train`` and each is evaluated with ``styletag eval --json`` on
the full 10,000-image test split:

    flat      --w-coarse 0 (fine loss only), decoded fine-only (coarse = parent of the fine label)
    joint     the seed: joint coarse + gated fine net, decoded independently (the seed) and consistently (ours)
    no-gate   the joint net without the gate (--no-gate: fine = Linear(f)), decoded both ways

Each command runs in its own process (``styletag`` next to this Python, else ``python -m model.cli``, the same
command). ``--reuse`` keeps a checkpoint under ``--work`` whose recorded training command is the one this run
would give (an interrupted ablation continues where it stopped). The results file records the rows, the exact
commands, the checkpoints' model versions, timings and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = {"limit": 30_000, "epochs": 3}
DEFAULT_OUT = ROOT / "docs" / "results" / "ablation-fmnist.json"

# name -> (extra train arguments, description)
MODELS: dict[str, tuple[list[str], str]] = {
    "flat": (["--w-coarse", "0"], "flat fine-only classifier (--w-coarse 0)"),
    "joint": ([], "joint coarse + gated fine net (the seed)"),
    "no-gate": (["--no-gate"], "joint net without the gate (--no-gate: fine = Linear(f))"),
}
# (model, decoding, row label)
ROWS: list[tuple[str, str, str]] = [
    ("flat", "fine-only", "flat fine-only classifier (coarse = parent of fine)"),
    ("joint", "independent", "the seed: joint coarse + gated fine net, each head's own argmax"),
    ("joint", "consistent", "ours: the same joint net, consistent (best valid pair) decoding"),
    ("no-gate", "independent", "joint net without the gate, each head's own argmax"),
    ("no-gate", "consistent", "joint net without the gate, consistent decoding"),
]


def common_args(limit: int, epochs: int, source: str | None, threads: int | None) -> list[str]:
    args = ["--data", "fmnist", "--taxonomy", "fashion-mnist", "--backbone", "resnet-tiny", "--epochs", str(epochs),
            "--batch-size", "128", "--lr", "3e-3", "--limit", str(limit), "--seed", "0"]
    if source:
        args += ["--source", source]
    if threads:
        args += ["--threads", str(threads)]
    return args


def styletag_prefix() -> list[str]:
    exe = Path(sys.executable).with_name("styletag")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "model.cli"]


def run_streamed(cmd: list[str], name: str) -> str:
    """Run ``cmd`` in the repository root, echo its output prefixed with ``name``; return the output."""
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            print(f"[{name}] {line}", end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"error: {shlex.join(cmd)} exited with {proc.returncode}")
    return "".join(lines)


def recorded_command(ckpt: Path) -> str | None:
    """The training command a finished checkpoint records (None: no checkpoint, or an unfinished one)."""
    from model.checkpoint import read_metadata

    if not ckpt.is_file():
        return None
    meta = read_metadata(ckpt)
    train = meta.get("train") or {}
    return meta.get("command") if train.get("epoch") == train.get("epochs") else None


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(),
            "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()], "git_commit": commit or None,
            "git_dirty": dirty}


def pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def markdown(rows: list[dict], smoke: bool) -> str:
    out = ["| model (same budget) | fine top-1 | coarse top-1 | consistency |", "|---|---|---|---|"]
    for r in rows:
        cons = pct(r["consistency"]) + (" (by construction)" if r["decoding"] == "fine-only" else "")
        out.append(f"| {r['label']} | {pct(r['fine_top1'])} | {pct(r['coarse_top1'])} | {cons} |")
    if smoke:
        out.append("")
        out.append("(SMOKE RUN: not the full budget; do not quote these numbers)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=FULL["limit"], help="First N training images (default 30000).")
    ap.add_argument("--epochs", type=int, default=FULL["epochs"], help="Epochs per model (default 3).")
    ap.add_argument("--source", default=None, help="Directory of the Fashion-MNIST IDX files.")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for training (recorded).")
    ap.add_argument("--device", default=None, help="Evaluation device (default: cuda if available).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/styletag-ablation"), help="Checkpoints go here.")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"Results JSON (default: {DEFAULT_OUT.relative_to(ROOT)} on the full budget, "
                         "else WORK/ablation-fmnist.json).")
    ap.add_argument("--reuse", action="store_true",
                    help="Keep a finished checkpoint in --work trained by the same command.")
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    smoke = (args.limit, args.epochs) != (FULL["limit"], FULL["epochs"])
    out = args.out or (args.work / "ablation-fmnist.json" if smoke else DEFAULT_OUT)
    args.work.mkdir(parents=True, exist_ok=True)
    prefix = styletag_prefix()
    common = common_args(args.limit, args.epochs, args.source, args.threads)
    started, t_all = datetime.now(UTC).replace(microsecond=0).isoformat(), time.time()
    info = machine()

    models: dict[str, dict] = {}
    for name, (extra, desc) in MODELS.items():
        ckpt = args.work / f"{name}.safetensors"
        train_args = ["train", *common, *extra, "--out", str(ckpt), "--no-progress"]
        shown = "styletag " + shlex.join(train_args)
        t0 = time.time()
        if args.reuse and recorded_command(ckpt) == shown:
            print(f"[{name}] reusing {ckpt} ({shown})", flush=True)
            seconds = None
        else:
            run_streamed([*prefix, *train_args], name)
            seconds = round(time.time() - t0, 1)
        from model.checkpoint import read_metadata

        meta = read_metadata(ckpt)
        models[name] = {"description": desc, "train_command": shown, "checkpoint": str(ckpt),
                        "model_version": meta["model_version"], "gate": meta.get("gate", True),
                        "train_seconds": seconds, "train_items": (meta.get("data") or {}).get("train_items"),
                        "epochs": (meta.get("train") or {}).get("epoch")}

    rows = []
    for name, decoding, label in ROWS:
        ckpt = models[name]["checkpoint"]
        eval_args = ["eval", "--checkpoint", ckpt, "--decoding", decoding, "--json"]
        if args.source:
            eval_args += ["--source", args.source]
        if args.device:
            eval_args += ["--device", args.device]
        cmd = [*prefix, *eval_args]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"error: {shlex.join(cmd)} exited with {res.returncode}: {res.stderr or res.stdout}")
        m = json.loads(res.stdout)
        rows.append({"label": label, "model": name, "decoding": decoding, "gate": models[name]["gate"],
                     "fine_top1": m["fine_top1"], "coarse_top1": m["coarse_top1"], "consistency": m["consistency"],
                     "n": m["n"], "model_version": m["model_version"], "train_command": models[name]["train_command"],
                     "eval_command": "styletag " + shlex.join(eval_args), "eval_seconds": m.get("seconds")})
        print(f"[eval] {name} {decoding}: fine {m['fine_top1']:.4f} coarse {m['coarse_top1']:.4f} "
              f"consistency {m['consistency']:.4f} (n={m['n']})", flush=True)

    table = markdown(rows, smoke)
    report = {
        "name": "ablation-fmnist",
        "description": "docs/model.md 'Ablation: the seed's claim, measured': flat vs joint+gate vs joint without "
                       "the gate, each decoding, on one small equal budget; Fashion-MNIST test split",
        "command": "python dev/ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "smoke": smoke,
        "budget": {"backbone": "resnet-tiny", "train_limit": args.limit, "epochs": args.epochs, "batch_size": 128,
                   "lr": 3e-3, "optimizer": "adamw", "schedule": "onecycle", "label_smoothing": 0.1, "seed": 0,
                   "val_share": "styletag train's default (0.1 of the training split held out)",
                   "test": "the full Fashion-MNIST test split (styletag eval)"},
        "started_at": started,
        "finished_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "seconds": round(time.time() - t_all, 1),
        "machine": info,
        "models": models,
        "rows": rows,
        "markdown": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
