"""The GPU benchmark (run by ``bench/gpu.sh``), made for a lent GPU machine that has torch and
torchvision but no Celery, boto3, Redis or PostgreSQL (SQLAlchemy travels as a wheel, see gpu.sh):

1. model-only throughput: the shipped checkpoint through ``Predictor`` (uint8 batches already on the
   device, and from host memory), and torchvision's resnet50 at 224 px in bf16 (channels_last);
2. JPEG decoding: ``torchvision.io.decode_jpeg`` on the device, batched, vs PIL on all CPU cores
   (full decode; and PIL with draft, what the pipeline does for a small model input);
3. the inline pipeline end to end (``retag --all --inline``) on SQLite and a file store, with its
   ratio to the GPU bound min(model rate, CPU-stage bound 1 / sum(1/rate) of fetch, decode, write);
4. the same with 1, 2, 4 pipeline processes sharing the device (``styletag worker --bulk-procs N``),
   each on its own slice of the products: their images/s together.

Without a GPU it runs the same steps on the CPU with small sizes (``--cpu`` forces that), so that the
script is tested where no GPU is lent. Images are synthesised (no dataset needed on the machine).

    python -m bench.gpu_bench [--cpu] [--quick] [--model PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best-of-N seconds of fn() (after one warm-up call)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# --- images ------------------------------------------------------------------------------------------


def synth_image(i: int, size: int, fmt: str) -> bytes:
    """A deterministic product-like picture: a grey silhouette on white, smooth (compresses like a photo)."""
    from PIL import Image, ImageDraw, ImageFilter

    rnd = np.random.default_rng(i)
    img = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rnd.integers(0, size // 2, 2)
        x1, y1 = x0 + rnd.integers(size // 4, size // 2), y0 + rnd.integers(size // 4, size // 2)
        d.ellipse((int(x0), int(y0), int(x1), int(y1)), fill=int(rnd.integers(0, 200)))
    img = img.filter(ImageFilter.GaussianBlur(max(1, size // 100)))
    if fmt == "jpeg":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=90)
    return buf.getvalue()


def synth_many(n: int, size: int, fmt: str) -> list[bytes]:
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        return list(pool.map(synth_image, range(n), [size] * n, [fmt] * n, chunksize=16))


def _pil_decode(data: bytes, draft_to: int | None) -> tuple:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if draft_to:
        img.draft("RGB", (draft_to, draft_to))
    img.load()
    return img.size


def _pil_decode_chunk(blobs: list[bytes], draft_to: int | None) -> int:
    for b in blobs:
        _pil_decode(b, draft_to)
    return len(blobs)


# --- 1. model only -------------------------------------------------------------------------------


def model_only(model_path: str | None, device: torch.device, quick: bool) -> dict:
    from model.predictor import Predictor

    out: dict = {}
    if model_path:
        p = Predictor.from_checkpoint(model_path, device=str(device), batch_size=1 << 20)
        size, ch = p.input_size, p.channels
        out["shipped"] = {"backbone": p.backbone, "input_size": size, "model_version": p.model_version}
        for bs in ((64,) if quick else (256, 1024, 4096)):
            host = torch.randint(0, 256, (bs, size, size, ch), dtype=torch.uint8)
            dev = host.to(device)
            reps = 1 if quick else 10
            out["shipped"][f"bs{bs}_on_device_img_s"] = bs / timed(lambda d=dev: p.predict_arrays(d), device, reps)
            out["shipped"][f"bs{bs}_from_host_img_s"] = bs / timed(lambda h=host: p.predict_arrays(h), device, reps)
            log(f"shipped model bs={bs}: {out['shipped'][f'bs{bs}_on_device_img_s']:.0f} img/s on device, "
                f"{out['shipped'][f'bs{bs}_from_host_img_s']:.0f} from host")
    else:
        out["shipped"] = {"skipped": "no checkpoint (model/weights/ has none; pass --model)"}
    import torchvision

    net = torchvision.models.resnet50(weights=None).to(device).eval().to(memory_format=torch.channels_last)
    bs = 256 if device.type == "cuda" else 4
    # bf16 on the GPU; the CPU fallback keeps float32 (bf16 without hardware support is ~50x slower)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(bs, 3, 224, 224, device=device).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            net(x)

    secs = timed(fwd, device, 1 if quick else 10)
    out["resnet50_224"] = {"batch": bs, "dtype": str(dtype), "img_s": bs / secs, "channels_last": True}
    log(f"resnet50 224px {dtype} bs={bs}: {bs / secs:.1f} img/s")
    return out


# --- 2. JPEG decoding -----------------------------------------------------------------------------


def jpeg_decoding(device: torch.device, quick: bool, images: int | None = None) -> dict:
    from torchvision.io import ImageReadMode, decode_jpeg

    n = images or (64 if quick else 2048)
    blobs = synth_many(n, 512, "jpeg")
    datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    out = {"images": n, "size": 512, "mean_bytes": sum(map(len, blobs)) / n}
    batch = 64 if quick else 256

    def tv():
        for i in range(0, n, batch):
            decode_jpeg(datas[i : i + batch], mode=ImageReadMode.RGB, device=device)

    out[f"torchvision_decode_jpeg_{device.type}_batched_img_s"] = n / timed(tv, device, 1 if quick else 3)
    cores = os.cpu_count() or 1
    chunks = [blobs[i : i + 32] for i in range(0, n, 32)]
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_pil_decode_chunk, chunks[:cores], [None] * cores))  # start the workers
        for label, draft in (("pil_full", None), ("pil_draft_64", 64)):
            t0 = time.perf_counter()
            sum(pool.map(_pil_decode_chunk, chunks, [draft] * len(chunks)))
            out[f"{label}_{cores}_cores_img_s"] = n / (time.perf_counter() - t0)
    out["cpu_cores"] = cores
    key = f"torchvision_decode_jpeg_{device.type}_batched_img_s"
    out["ratio_device_vs_pil_full"] = out[key] / out[f"pil_full_{cores}_cores_img_s"]
    log(f"JPEG 512: torchvision on {device.type} {out[key]:.0f}/s, PIL on {cores} cores "
        f"{out[f'pil_full_{cores}_cores_img_s']:.0f}/s (draft {out[f'pil_draft_64_{cores}_cores_img_s']:.0f}/s)")
    return out


# --- 3. inline pipeline ---------------------------------------------------------------------------


def pipeline_e2e(model_path: str | None, device: torch.device, quick: bool, kinds: list[str],
                 products: int | None = None) -> dict:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        msg = ("skipped: SQLAlchemy is not installed here; on the dev machine run 'bash bench/gpu.sh --prepare' "
               "and carry .whl (gpu.sh installs the wheels it finds there)")
        log(msg)
        return {"skipped": msg}
    if not model_path:
        return {"skipped": "no checkpoint"}

    from bench.stages import decode_rate, fetch_rate, write_rate
    from catalog.settings import Settings
    from catalog.storage import ImageReader
    from worker.context import get_context, reset_context
    from worker.producers.retag import run_inline, start_run

    out: dict = {}
    n = products or (256 if quick else 8192)
    tmp = Path(tempfile.mkdtemp(prefix="styletag-gpu-"))
    os.environ["STYLETAG_DEVICE"] = device.type
    for kind in kinds:
        store = tmp / f"images-{kind}"
        uris = _write_store(store, n, kind)
        url = _sqlite_catalog(str(tmp / f"{kind}.db"), uris)
        from dataclasses import replace

        settings = replace(Settings.from_env(), database_url=url, store_url=store.as_uri(), model_path=model_path,
                           allowed_image_prefixes=(store.as_uri() + "/",))
        reset_context()
        ctx = get_context(settings)
        pred = ctx.predictor
        _ = ctx.labels
        reader = ImageReader.from_settings(settings)
        sample = uris[: min(n, 2048)]
        data = [reader.get(u) for u in sample]
        bs = settings.batch_size
        x = torch.from_numpy(np.stack([np.zeros((pred.input_size, pred.input_size, pred.channels), np.uint8)] * bs))
        if device.type == "cuda":
            model_rate = bs / timed(lambda p=pred, x=x: p.predict(x), device, 10)
        else:  # as the pipeline runs it on a CPU (batch split over threads), or plain: the faster
            from bench.stages import model_rates

            model_rate = model_rates(ctx, bs, 2 * bs)["best"]
        rates = {
            "fetch": fetch_rate(reader, sample, settings.fetch_threads),
            "decode": decode_rate(data, pred.input_size, pred.channels, threads=settings.fetch_threads),
            "write": write_rate(_sqlite_catalog(str(tmp / f"{kind}-writes.db"), []), min(n, 4096), bs)["retag"],
        }
        cpu_bound = 1.0 / sum(1.0 / r for r in rates.values())
        bound = min(model_rate, cpu_bound) if device.type == "cuda" else 1.0 / (1.0 / cpu_bound + 1.0 / model_rate)
        run_id = start_run(settings, scope="all", model_version=pred.model_version)
        rep = run_inline(settings, run_id, progress=False)
        rate = rep.products / rep.wall_s
        out[kind] = {"products": rep.products, "failed": rep.failed, "seconds": rep.wall_s, "img_s": rate,
                     "stage_rates": {**rates, "model": model_rate}, "cpu_stage_bound": cpu_bound, "bound": bound,
                     "ratio_to_bound": rate / bound, "target": 0.85,
                     "stage_seconds": {k: round(v, 3) for k, v in rep.seconds.items()}}
        log(f"pipeline {kind}: {rate:.0f} img/s, bound {bound:.0f} (model {model_rate:.0f}, CPU stages "
            f"{cpu_bound:.0f}) -> {rate / bound:.2f} x bound")
    reset_context()
    return out


# --- 4. several pipeline processes per device (``styletag worker --bulk-procs N``) -------------------


def _write_store(store: Path, n: int, kind: str) -> list[str]:
    """``n`` synthesised images of ``kind`` (1,024 distinct ones, repeated) in a folder; their URIs."""
    size, fmt = (28, "png") if kind == "png28" else (512, "jpeg")
    store.mkdir(parents=True, exist_ok=True)
    blobs = synth_many(min(n, 1024), size, fmt)
    uris = []
    for i in range(n):
        path = store / f"{i:06d}.{'png' if fmt == 'png' else 'jpg'}"
        path.write_bytes(blobs[i % len(blobs)])
        uris.append(path.as_uri())
    return uris


def _sqlite_catalog(db: str, uris: list[str], first: int = 0) -> str:
    """A SQLite catalog of one product per URI (SKUs numbered from ``first``; none: an empty catalog for
    the write stage); its URL."""
    from sqlalchemy import insert

    from catalog.db import engine_for
    from catalog.schema import Base, Product

    url = f"sqlite:///{db}"
    Base.metadata.create_all(engine_for(url))  # no Alembic here: the ORM's schema is the same
    if not uris:
        return url
    with engine_for(url).begin() as conn:
        conn.execute(insert(Product.__table__), [
            {"sku": f"gpu-{first + i:06d}", "title": "", "image_uri": u, "image_version": "v1"}
            for i, u in enumerate(uris)])
    return url


def _scaling_child(store: str, db: str, uris: list[str], first: int, model_path: str, device: str,
                   gate: str) -> dict:
    """One pipeline process: its own SQLite catalog of ``uris`` (a slice of the shared store), warmed up,
    then ``retag --all --inline`` once the parent opens the gate."""
    os.environ["STYLETAG_DEVICE"] = device
    from dataclasses import replace

    from catalog.settings import Settings
    from worker.context import get_context, reset_context
    from worker.producers.retag import run_inline, start_run

    store_uri = Path(store).as_uri()
    url = _sqlite_catalog(db, uris, first)
    settings = replace(Settings.from_env(), database_url=url, store_url=store_uri, model_path=model_path,
                       allowed_image_prefixes=(store_uri + "/",))
    reset_context()
    ctx = get_context(settings)
    pred = ctx.predictor
    pred.predict(np.zeros((settings.batch_size, pred.input_size, pred.input_size, pred.channels), np.uint8))
    run_id = start_run(settings, scope="all", model_version=pred.model_version)
    Path(db + ".ready").touch()
    while not Path(gate).exists():
        time.sleep(0.002)
    t0 = time.time()
    rep = run_inline(settings, run_id, progress=False)
    return {"products": rep.products, "failed": rep.failed, "start": t0, "end": time.time()}


def pipeline_scaling(model_path: str | None, device: torch.device, quick: bool, kinds: list[str],
                     procs_list: list[int], products: int | None = None) -> dict:
    """Aggregate images/s of N inline pipeline processes on one device, each on its own slice of the
    products (what ``styletag worker --bulk-procs N`` runs), from a common start."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        return {"skipped": "SQLAlchemy is not installed here (see bench/gpu.sh --prepare)"}
    if not model_path:
        return {"skipped": "no checkpoint"}
    import multiprocessing

    n = products or (256 if quick else 8192)
    tmp = Path(tempfile.mkdtemp(prefix="styletag-gpu-scaling-"))
    spawn = multiprocessing.get_context("spawn")
    out: dict = {"products": n, "cpu_cores": os.cpu_count()}
    for kind in kinds:
        store = tmp / f"images-{kind}"
        uris = _write_store(store, n, kind)
        out[kind] = {}
        for procs in procs_list:
            per = n // procs
            gate = tmp / f"go-{kind}-{procs}"
            dbs = [str(tmp / f"{kind}-{procs}-{i}.db") for i in range(procs)]
            with ProcessPoolExecutor(procs, mp_context=spawn) as pool:
                futures = [pool.submit(_scaling_child, str(store), dbs[i], uris[i * per:(i + 1) * per], i * per,
                                       model_path, device.type, str(gate)) for i in range(procs)]
                deadline = time.monotonic() + 300
                while not all(Path(d + ".ready").exists() for d in dbs):
                    if any(f.done() for f in futures) or time.monotonic() > deadline:
                        break  # a child failed: its result() below raises
                    time.sleep(0.01)
                gate.touch()
                results = [f.result() for f in futures]
            wall = max(r["end"] for r in results) - min(r["start"] for r in results)
            total = sum(r["products"] for r in results)
            out[kind][f"procs{procs}"] = {"img_s": total / wall, "products": total, "seconds": wall,
                                          "per_process_img_s": [r["products"] / (r["end"] - r["start"])
                                                                for r in results]}
            log(f"pipeline {kind}, {procs} process(es): {total / wall:.0f} img/s together")
        base = out[kind].get("procs1", {}).get("img_s")
        if base:
            for v in out[kind].values():
                v["speedup_vs_1"] = v["img_s"] / base
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def default_model() -> str | None:
    try:
        from model.weights import DEFAULT_CHECKPOINT
    except ImportError:
        return None
    return str(DEFAULT_CHECKPOINT) if Path(DEFAULT_CHECKPOINT).is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    ap.add_argument("--quick", action="store_true", help="smallest sizes (implied without a GPU)")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped one)")
    ap.add_argument("--out", default=None, help="folder for gpu.json (default: bench/results, or $OUT if set)")
    ap.add_argument("--kinds", default="png28,jpeg512")
    ap.add_argument("--products", type=int, default=None, help="products per pipeline run")
    ap.add_argument("--images", type=int, default=None, help="JPEGs for the decoding comparison")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: model,decode,pipeline,scaling")
    ap.add_argument("--procs", default="1,2,4", help="pipeline processes per device for the scaling part")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    model_path = args.model or default_model()
    skip = set(filter(None, args.skip.split(",")))
    info = {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({cpu_name()}, "
            f"{os.cpu_count()} cores) -- fallback, figures not representative",
            "cuda": cuda, "torch": torch.__version__, "python": platform.python_version(), "quick": quick,
            "model": model_path}
    log(f"device: {info['device']}; torch {torch.__version__}")
    t0 = time.perf_counter()
    res = {"name": "gpu", "machine": info}
    if "model" not in skip:
        res["model_only"] = model_only(model_path, device, quick)
    if "decode" not in skip:
        res["jpeg_decoding"] = jpeg_decoding(device, quick, args.images)
    if "pipeline" not in skip:
        res["pipeline"] = pipeline_e2e(model_path, device, quick, args.kinds.split(","), args.products)
    if "scaling" not in skip:
        procs = [int(p) for p in args.procs.split(",") if p.strip()]
        res["pipeline_scaling"] = pipeline_scaling(model_path, device, quick, args.kinds.split(","), procs,
                                                   args.products)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    log(f"wrote {out_dir / 'gpu.json'} in {res['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
