"""Train several Fashion-MNIST configurations side by side on one lent GPU, inside a wall-clock budget.

A lent GPU comes with a fixed number of minutes, so each run's epoch count is fitted to the budget: every
run starts with its target epoch count; when its second epoch ends, the driver projects the run's length
from that epoch's wall time and, if it would not finish before the deadline, restarts it (once) with as many
epochs as fit. The recorded command of every checkpoint is therefore a plain ``styletag train`` command
that reproduces it. A run still going at the hard deadline is stopped and its last epoch's checkpoint is
kept with ``-partial`` in the name.

    python dev/gpu_train.py --budget 330 --source DIR --work /tmp/train --out "$OUT" [--only small,wide]
    python dev/gpu_train.py --budget 60 --limit 2048 --device cpu ...   # a dry run on the CPU

Each run's log lines are prefixed with its name; ``runs.json`` in --out sums the runs up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["--data", "fmnist", "--taxonomy", "fashion-mnist", "--optimizer", "adamw", "--schedule", "onecycle",
          "--warmup", "0.15", "--label-smoothing", "0.1", "--seed", "0", "--threads", "2", "--val-limit", "2000",
          "--no-progress"]
# name -> (target epochs, extra train arguments)
CONFIGS: dict[str, tuple[int, list[str]]] = {
    "small": (200, ["--backbone", "resnet-small", "--batch-size", "256", "--lr", "3e-3"]),
    "wide": (200, ["--backbone", "resnet-wide", "--batch-size", "256", "--lr", "3e-3"]),
    "small-coarse2": (200, ["--backbone", "resnet-small", "--batch-size", "256", "--lr", "3e-3", "--w-coarse", "2"]),
}
EPOCH_RE = re.compile(r"^epoch epoch=(\d+) .*?seconds=([\d.]+)")


@dataclass
class Run:
    name: str
    epochs: int
    extra: list[str]
    ckpt: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarted: bool = False
    done: bool = False
    killed: bool = False
    first_epoch_s: float | None = None
    epoch_seen: dict = field(default_factory=dict)  # epoch -> wall time its line came
    last_epoch: int = 0
    lines: list[str] = field(default_factory=list)


def launch(run: Run, args, log) -> None:
    cmd = [sys.executable, "-m", "model.cli", "train", *COMMON, *run.extra, "--epochs", str(run.epochs),
           "--out", str(run.ckpt)]
    if args.source:
        cmd += ["--source", args.source]
    if args.device:
        cmd += ["--device", args.device]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    for stale in run.ckpt.parent.glob(run.ckpt.name + "*"):
        stale.unlink()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    run.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run.started = time.time()
    run.first_epoch_s, run.last_epoch, run.epoch_seen = None, 0, {}
    log(f"[{run.name}] start: {' '.join(cmd[3:])}")
    threading.Thread(target=pump, args=(run, run.proc, log), daemon=True).start()


def pump(run: Run, proc: subprocess.Popen, log) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if proc is not run.proc:  # output of a run that was restarted
            continue
        run.lines.append(line)
        log(f"[{run.name}] {line}")
        m = EPOCH_RE.match(line)
        if m:
            run.last_epoch = int(m.group(1))
            run.epoch_seen[run.last_epoch] = time.time()
            if run.last_epoch == 1:
                run.first_epoch_s = float(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, required=True, help="seconds from start to the last checkpoint")
    ap.add_argument("--source", default=None)
    ap.add_argument("--work", default="/tmp/styletag-gpu-train")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/styletag-gpu-out"))
    ap.add_argument("--only", default="", help="comma-separated config names")
    ap.add_argument("--device", default=None)
    ap.add_argument("--limit", type=int, default=None, help="training items (dry runs)")
    ap.add_argument("--epochs", type=int, default=None, help="override every target epoch count (dry runs)")
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    deadline = t_start + args.budget
    log_fh = open(out / "train.log", "a")
    lock = threading.Lock()

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} +{time.time() - t_start:5.0f}s {msg}"
        with lock:
            print(line, flush=True)
            log_fh.write(line + "\n")
            log_fh.flush()

    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    runs = []
    for name in names:
        epochs, extra = CONFIGS[name]
        runs.append(Run(name, args.epochs or epochs, extra, work / f"fmnist-{name}.safetensors"))
    for r in runs:
        launch(r, args, log)

    margin = 20.0  # final evaluation on 10k images + writing the checkpoint
    while True:
        time.sleep(0.5)
        now = time.time()
        for r in runs:
            if r.done or r.proc is None:
                continue
            if r.proc.poll() is not None:
                r.done = True
                log(f"[{r.name}] exited {r.proc.returncode} after {now - r.started:.0f}s")
                continue
            seen = dict(r.epoch_seen)
            if 2 in seen and not r.restarted:
                # epoch 2 is the steady state (epoch 1 pays for warm-up); its wall time includes validation
                per_epoch = seen[2] - seen[1]
                startup = max(seen[1] - r.started - per_epoch, 1.0)
                left = deadline - now - margin
                need = per_epoch * (r.epochs - r.last_epoch)
                r.restarted = True  # decide once
                if need > left:
                    fit = max(1, math.floor((deadline - now - margin - startup) / per_epoch))
                    log(f"[{r.name}] {r.epochs} epochs would take {need + now - r.started:.0f}s "
                        f"(epoch 2: {per_epoch:.1f}s); restarting with {fit} epochs")
                    r.proc.kill()
                    r.proc.wait()
                    r.epochs = fit
                    launch(r, args, log)
                    r.restarted = True
                else:
                    log(f"[{r.name}] on time: {r.epochs} epochs at {per_epoch:.1f}s each, about {need:.0f}s left")
            if now > deadline + margin:
                log(f"[{r.name}] past the deadline at epoch {r.last_epoch}: stopping it")
                r.proc.kill()
                r.proc.wait()
                r.killed = r.done = True
        if all(r.done for r in runs):
            break

    summary = []
    for r in runs:
        finished = r.proc is not None and r.proc.returncode == 0 and not r.killed
        entry = {"name": r.name, "epochs": r.epochs, "finished": finished, "epochs_done": r.last_epoch,
                 "first_epoch_s": r.first_epoch_s,
                 "epoch_wall_s": round(r.epoch_seen[2] - r.epoch_seen[1], 2) if 2 in r.epoch_seen else None, "args": r.extra}
        if r.ckpt.is_file():
            dest = out / (r.ckpt.name if finished else r.ckpt.name.replace(".safetensors", "-partial.safetensors"))
            shutil.copy(r.ckpt, dest)
            entry["checkpoint"] = dest.name
            final = [ln for ln in r.lines if ln.startswith("final ")]
            if final:
                entry["final"] = final[-1]
        summary.append(entry)
    (out / "runs.json").write_text(json.dumps({"budget_s": args.budget, "wall_s": round(time.time() - t_start, 1),
                                               "runs": summary}, indent=1) + "\n")
    log(f"done in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
