"""``make bench``: every benchmark, each in its own process, then one summary table.

    python -m bench.run_all [--quick] [--model PATH] [--only a,b] [--skip a,b]

Results: ``bench/results/<name>.json`` (machine-readable: name, parameters, figures, and the checks
with their bound or baseline, ratio, target and met) and ``bench/results/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import common as C

# Cheapest first; the 1M-row catalog (queries, then producer, which reuses it) last.
BENCHMARKS = ["stages", "writes", "e2e", "alternatives", "photo", "uploads", "uploads-photo", "worker_rss", "queries",
              "producer", "gpu"]
VARIANTS = {"uploads-photo": ("uploads", ["--kind", "photo"])}  # result name -> (module, its arguments)
TIMEOUT_S = 900
# photo: its first full run also renders its 2,048 photos (about 30 CPU-ms each)
TIMEOUTS = {"photo": 1800}


def run_one(name: str, args) -> tuple[int, float]:
    if name == "gpu":  # the GPU script's CPU fallback (this machine has no GPU)
        argv = ["bash", str(C.ROOT / "bench" / "gpu.sh"), "--cpu", "--quick"]
        if args.model:
            argv += ["--model", args.model]
    else:
        module, extra = VARIANTS.get(name, (name, []))
        argv = [sys.executable, "-m", f"bench.{module}", *extra]
        if args.quick:
            argv.append("--quick")
        # --model is the grey checkpoint; the photo benches take their own (the trained photo one when present)
        if args.model and name not in ("writes", "queries", "photo", "uploads-photo"):
            argv += ["--model", args.model]
    t0 = time.perf_counter()
    C.log(f"--- {name}: {' '.join(argv[1:])}")
    try:
        rc = subprocess.run(argv, cwd=C.ROOT, timeout=TIMEOUTS.get(name, TIMEOUT_S), env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, time.perf_counter() - t0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def table(names: list[str], status: dict[str, tuple[int, float]]) -> str:
    rows = [("benchmark", "check", "value", "unit", "vs (baseline/bound)", "ratio", "target", "met")]
    for name in names:
        path = C.RESULTS / f"{name}.json"
        rc, secs = status.get(name, (None, 0.0))
        if rc not in (0, None) or not path.is_file():
            rows.append((name, f"FAILED (exit {rc}, {secs:.0f}s)", "", "", "", "", "", "no"))
            continue
        data = json.loads(path.read_text())
        if name == "gpu":
            rows.extend(_gpu_rows(data))
            continue
        for c in data["checks"]:
            base = "" if c["baseline"] is None else f"{_fmt(c['baseline'])} {c['baseline_label']}".strip()
            met = {True: "yes", False: "NO", None: ""}[c["met"]]
            rows.append((name, c["check"], _fmt(c["value"]), c["unit"], base, _fmt(c["ratio"]), c["target"], met))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _gpu_rows(data: dict) -> list[tuple]:
    dev = data["machine"]["device"]
    rows = [("gpu", f"device: {dev[:60]}", "", "", "", "", "", "")]
    pipe = data.get("pipeline", {})
    for kind, r in pipe.items():
        if isinstance(r, dict) and "img_s" in r:
            rows.append(("gpu", f"pipeline {kind} (fallback)", _fmt(r["img_s"]), "img/s", f"{_fmt(r['bound'])} bound",
                         _fmt(r["ratio_to_bound"]), "(GPU: >= 0.85 x)", ""))
    if "skipped" in pipe:
        rows.append(("gpu", "pipeline skipped", "", "", "", "", "", ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest sizes: a smoke test, not figures")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped one)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--skip", default="")
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in names if n not in set(args.skip.split(","))]
    if any(n != "gpu" for n in names):
        C.model_path(args.model)  # fail early and clearly when there is no checkpoint
    t0 = time.perf_counter()
    status = {}
    for name in names:
        (C.RESULTS / f"{name}.json").unlink(missing_ok=True)
        status[name] = run_one(name, args)
    total = time.perf_counter() - t0
    text = table(names, status)
    print()
    print(text)
    m = C.machine()
    print(f"\n{len(names)} benchmarks in {total / 60:.1f} min on {m['cpu']}, {m['cores']} cores, "
          f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}; results in {C.RESULTS}")
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    (C.RESULTS / "summary.json").write_text(json.dumps(
        {"benchmarks": names, "seconds": round(total, 1), "quick": args.quick, "machine": m,
         "exit_codes": {k: v[0] for k, v in status.items()}, "table": text.splitlines()}, indent=1) + "\n")
    return 0 if all(v[0] == 0 for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
