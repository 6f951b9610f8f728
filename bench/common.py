"""Shared plumbing of the benchmarks: results files, the machine, the model, catalogs, services.

Every benchmark is a module ``bench.<name>`` with ``main(argv)``; ``bench.run_all`` runs each in its
own process (so torch thread settings, memory and a crash stay local) and prints the summary table.
A benchmark writes ``bench/results/<name>.json``: name, parameters, figures, and a list of checks,
each with its baseline or bound, the ratio, the target and whether it was met.

Catalogs live in dedicated PostgreSQL databases ``styletag_bench_*`` (kept between runs, so a second
``make bench`` skips the imports) and images under ``$STYLETAG_BENCH_DIR`` (default
``.styletag/bench``). Redis: database ``$STYLETAG_BENCH_REDIS_DB`` (default 15), flushed before use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("STYLETAG_BENCH_RESULTS", str(ROOT / "bench" / "results")))
WORK = Path(os.environ.get("STYLETAG_BENCH_DIR", str(ROOT / ".styletag" / "bench")))
REDIS_DB = int(os.environ.get("STYLETAG_BENCH_REDIS_DB", "15"))
PG_BASE = os.environ.get("STYLETAG_BENCH_PG", "")

# The two image kinds of the issue: Fashion-MNIST as imported (28 px PNG) and product-photo sized JPEGs.
KINDS = {"png28": {"size": 28, "fmt": "png"}, "jpeg512": {"size": 512, "fmt": "jpeg"}}


# --- arguments and results --------------------------------------------------------------------------


def parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    p.add_argument("--quick", action="store_true", help="smallest sizes (smoke test), figures not meaningful")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped one)")
    return p


def model_path(arg: str | None) -> str:
    """``--model`` or the shipped checkpoint; a clear line when neither exists."""
    if arg:
        path = Path(arg)
    else:
        from model.weights import DEFAULT_CHECKPOINT

        path = Path(DEFAULT_CHECKPOINT)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found; pass --model PATH (e.g. a styletag train output)")
    return str(path.resolve())


def model_info(path: str) -> dict:
    from model.checkpoint import read_metadata

    meta = read_metadata(path)
    return {"path": path, "model_version": meta["model_version"], "backbone": meta["backbone"],
            "input_size": int(meta["input_size"]), "channels": int(meta["channels"])}


_machine: dict | None = None


def machine() -> dict:
    global _machine
    if _machine is None:
        name = platform.processor() or "unknown"
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"^Model name:\s*(.+)$", out, re.M)
            name = m.group(1).strip() if m else name
        except (OSError, subprocess.SubprocessError):
            pass
        import torch

        mem = 0
        try:
            mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024
        except (OSError, AttributeError):
            pass
        _machine = {"cpu": name, "cores": os.cpu_count(), "memory_mib": mem, "gpu": None,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "host": socket.gethostname()}
        if torch.cuda.is_available():
            _machine["gpu"] = torch.cuda.get_device_name(0)
    return _machine


def check(label: str, value: float | None, *, unit: str, target: str, met: bool | None,
          baseline: float | None = None, ratio: float | None = None, baseline_label: str = "") -> dict:
    """One line of the summary table."""
    return {"check": label, "value": _round(value), "unit": unit, "baseline": _round(baseline),
            "baseline_label": baseline_label, "ratio": _round(ratio, 3), "target": target, "met": met}


def _round(v, nd: int = 2):
    if v is None:
        return None
    return round(float(v), nd) if abs(float(v)) < 1e6 else round(float(v))


@dataclass
class Result:
    name: str
    description: str
    parameters: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    load_at_start: list = field(default_factory=lambda: [round(x, 2) for x in os.getloadavg()])

    def write(self, quick: bool = False) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        mets = [c["met"] for c in self.checks if c["met"] is not None]
        data = {
            "name": self.name,
            "description": self.description,
            "command": f"{Path(sys.executable).name} -m bench.{self.name} " + " ".join(sys.argv[1:]),
            "quick": quick,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - self.started, 1),
            "machine": machine(),
            # other work on the machine while this ran (a shared box: compare ratios, not absolutes)
            "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
            "load_average_at_start": self.load_at_start,
            "parameters": self.parameters,
            "figures": self.figures,
            "checks": self.checks,
            "met": all(mets) if mets else None,
            "notes": self.notes,
        }
        path = RESULTS / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(path)
        return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def best_ms(fn, items, repeats: int = 3) -> float:
    """Milliseconds per item of ``fn`` over ``items``: the best of ``repeats`` passes, after 3 warm-up calls."""
    for x in items[:3]:
        fn(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(items) * 1000)
    return best


def rate_bound(rates: dict[str, float]) -> float:
    """CPU bound of a pipeline whose stages share the cores: 1 / sum(1 / rate_i)."""
    return 1.0 / sum(1.0 / r for r in rates.values() if r > 0)


# --- environment for styletag code and subprocesses --------------------------------------------------


def broker_url() -> str:
    return os.environ.get("STYLETAG_BENCH_BROKER", f"redis://127.0.0.1:6379/{REDIS_DB}")


def flush_broker() -> None:
    import redis

    redis.Redis.from_url(broker_url()).flushdb()


def styletag_env(db_url: str, store_url: str, model: str, **extra: str) -> dict[str, str]:
    env = {
        "STYLETAG_DATABASE_URL": db_url,
        "STYLETAG_BROKER_URL": broker_url(),
        "STYLETAG_STORE_URL": store_url,
        "STYLETAG_ALLOWED_IMAGE_PREFIXES": store_url.rstrip("/") + "/",
        "STYLETAG_MODEL": model,
        "STYLETAG_HOME": str(WORK / "home"),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def apply_env(env: dict[str, str]) -> None:
    """Point this process's styletag code (settings, the Celery app, the context) at ``env``."""
    os.environ.update(env)
    from worker.context import reset_context

    reset_context()


def settings_for(db_url: str, store_url: str, model: str, **overrides):
    from dataclasses import replace

    from catalog.settings import Settings

    base = Settings.from_env()
    return replace(base, database_url=db_url, store_url=store_url, model_path=model,
                   allowed_image_prefixes=(store_url.rstrip("/") + "/",), **overrides)


# --- PostgreSQL ------------------------------------------------------------------------------------


def _libpq(base: str, dbname: str) -> str:
    return base.replace("postgresql+psycopg://", "postgresql://", 1).rstrip("/") + "/" + dbname


def pg_base() -> str:
    import psycopg

    candidates = [PG_BASE] if PG_BASE else ["postgresql+psycopg://root@127.0.0.1:5432",
                                           "postgresql+psycopg://postgres@127.0.0.1:5432"]
    for base in candidates:
        try:
            with psycopg.connect(_libpq(base, "postgres"), connect_timeout=3):
                return base.rstrip("/")
        except psycopg.Error:
            continue
    raise SystemExit("error: PostgreSQL not reachable on 127.0.0.1:5432 (set STYLETAG_BENCH_PG)")


def pg_database(name: str, *, fresh: bool = False, migrate: bool = True) -> str:
    """A dedicated database (created, migrated); ``fresh`` drops it first."""
    import psycopg

    base = pg_base()
    with psycopg.connect(_libpq(base, "postgres"), autocommit=True) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    if migrate:
        from catalog.migrate import upgrade

        upgrade(url)
    return url


def pg_connect(url: str, **kwargs):
    import psycopg

    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), **kwargs)


def reset_tags(url: str) -> None:
    """Forget every tag, state and run (keeps products, labels and models)."""
    from sqlalchemy import text

    from catalog.db import engine_for

    with engine_for(url).begin() as conn:
        if url.startswith("postgresql"):
            conn.execute(text("TRUNCATE product_styles, tag_state, tagging_runs RESTART IDENTITY CASCADE"))
        else:
            for t in ("product_styles", "tag_state", "tagging_runs"):
                conn.execute(text(f"DELETE FROM {t}"))  # noqa: S608 - fixed names


def sqlite_catalog(name: str) -> str:
    from catalog.migrate import upgrade

    path = WORK / f"{name}.db"
    for p in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        p.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


# --- image catalogs ----------------------------------------------------------------------------------


def store_dir(kind: str) -> Path:
    return WORK / f"images-{kind}"


def catalog_ready(url: str, store_url: str, files: Path, n: int) -> bool:
    """Whether the benchmark catalog at ``url`` can be reused: at least ``n`` products, at least ``n`` image
    files under ``files``, and every product's image in ``store_url`` (the database outlives a checkout: one
    imported from another clone points at that clone's store, whose images this checkout's prefix refuses;
    re-importing points every product here)."""
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import Product

    with session_scope(url) as s:
        have = s.execute(select(func.count()).select_from(Product)).scalar()
        foreign = s.execute(select(func.count()).select_from(Product)
                            .where(Product.image_uri.not_like(store_url + "/%"))).scalar()
    n_files = sum(1 for _ in files.iterdir()) if files.is_dir() else 0
    return have >= n and n_files >= n and not foreign


def ensure_catalog(kind: str, n: int, db_url: str | None = None) -> tuple[str, str]:
    """Exactly ``n`` Fashion-MNIST test products of ``kind`` in ``styletag_bench_<kind>_<n>`` (or
    ``db_url``), so that ``retag --all`` covers those and no more; their images in a file store shared
    by every size. Imported once and reused. Returns (database URL, store URL)."""
    from catalog.importers import import_fashion_mnist

    spec = KINDS[kind]
    url = db_url or pg_database(f"styletag_bench_{kind}_{n}")
    store = store_dir(kind)
    store.mkdir(parents=True, exist_ok=True)
    store_url = store.resolve().as_uri()
    if not catalog_ready(url, store_url, store / "fmnist" / "test", n):
        log(f"importing {n} Fashion-MNIST products as {kind} into {url.rsplit('/', 1)[-1]}")
        import_fashion_mnist(url, store_url, "test", limit=n, size=spec["size"], fmt=spec["fmt"], progress=False)
    return url, store_url


def product_ids(url: str, n: int) -> list[int]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import Product

    with session_scope(url) as s:
        return list(s.scalars(select(Product.id).order_by(Product.id).limit(n)))


def image_uris(url: str, n: int) -> list[str]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import Product

    with session_scope(url) as s:
        return list(s.scalars(select(Product.image_uri).order_by(Product.id).limit(n)))


# --- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A real ``styletag worker --gpus none`` subprocess (the launcher and its Celery children)."""

    def __init__(self, env: dict[str, str], queues: str = "bulk", log_name: str = "worker",
                 argv: list[str] | None = None, ready_marks: int | None = None):
        WORK.mkdir(parents=True, exist_ok=True)
        self.log_path = WORK / f"{log_name}.log"
        self.log = open(self.log_path, "wb")
        self.n_nodes = ready_marks or len(queues.split(","))
        self.n_models = self.n_nodes  # "model loaded" marks: one per pool process
        if argv is None:  # the launcher's defaults: a bulk worker has one pool process per core on a CPU host
            argv = [sys.executable, "-m", "worker.cli", "worker", "--gpus", "none", "--queues", queues]
            self.n_models = ready_marks or sum(self.default_bulk_procs() if q == "bulk" else 1
                                               for q in queues.split(","))
        elif "--bulk-procs" in argv:
            self.n_models = ready_marks or int(argv[argv.index("--bulk-procs") + 1])
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @staticmethod
    def default_bulk_procs() -> int:
        """The bulk pool processes ``styletag worker --gpus none`` starts on this host."""
        from worker.ops.launcher import cpu_bulk_procs

        return cpu_bulk_procs()

    def wait_ready(self, timeout: float = 180.0, model_marks: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.text()[-3000:]}")
            t = self.text()
            if t.count(" ready.") >= self.n_nodes and (not model_marks or t.count("model loaded") >= self.n_models):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.text()[-3000:]}")

    def pids(self) -> list[int]:
        """Every process of the worker's tree."""
        return descendants(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    cur = re.search(r"VmRSS:\s+(\d+)", text)
    hwm = re.search(r"VmHWM:\s+(\d+)", text)
    return (int(cur.group(1)) / 1024 if cur else 0.0, int(hwm.group(1)) / 1024 if hwm else 0.0)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MotoServer:
    """A moto S3 server subprocess on a free loopback port; AWS_* variables point boto3 at it."""

    def __init__(self):
        self.port = free_port()
        exe = Path(sys.executable).with_name("moto_server")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        WORK.mkdir(parents=True, exist_ok=True)
        self.log = open(WORK / "moto.log", "wb")
        self.proc = subprocess.Popen([*argv, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on port {self.port}") from None
                time.sleep(0.1)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(self.env)
        from catalog.storage import reset_s3_client

        reset_s3_client()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout:.0f}s")


def run_status(url: str, run_id: int) -> dict:
    """The run's counters and its wall time from the database (created_at -> finished_at)."""
    from catalog.db import session_scope
    from catalog.runs import get_run

    with session_scope(url) as s:
        r = get_run(s, run_id)
        out = {"status": r.status, "total": r.total, "done": r.done, "failed": r.failed}
        if r.finished_at is not None:
            out["seconds"] = (_utc(r.finished_at) - _utc(r.created_at)).total_seconds()
    return out


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def celery_retag(db_url: str, settings, *, timeout: float = 900, chunk: int = 1024) -> dict:
    """``retag --all`` through the broker (a worker must be serving ``bulk``): enqueue, wait, and
    report the rate from the run's own timestamps (enqueue start to last write)."""
    from worker.producers.retag import enqueue_run, start_run

    run_id = start_run(settings, scope="all")
    enqueue_run(settings, run_id, chunk=chunk)
    st = wait_until(lambda: (s := run_status(db_url, run_id))["status"] == "done" and s, timeout=timeout,
                    interval=0.1, what=f"run {run_id} done")
    n = st["done"] + st["failed"]
    return {"run_id": run_id, "products": n, "failed": st["failed"], "seconds": st["seconds"],
            "images_per_s": n / st["seconds"]}


def inline_retag(settings) -> dict:
    """``retag --all --inline``: the same pipeline in this process."""
    from worker.context import get_context
    from worker.producers.retag import run_inline, start_run

    get_context(settings)  # warm: the model loads outside the timing, as in a running worker
    _ = get_context(settings).labels
    run_id = start_run(settings, scope="all")
    rep = run_inline(settings, run_id, progress=False)
    return {"run_id": run_id, "products": rep.products, "failed": rep.failed, "seconds": rep.wall_s,
            "images_per_s": rep.products / rep.wall_s, "stage_seconds": {k: round(v, 3) for k, v in rep.seconds.items()}}


def which(name: str) -> str | None:
    return shutil.which(name)
