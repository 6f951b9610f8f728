"""The compose deployment's commands, run as local processes (there is no Docker engine here).

docker-compose.yml is parsed and the commands of ``migrate``, ``worker-cpu``, ``beat``, ``metrics``
and ``flower`` are started exactly as written (``styletag ...`` / ``celery ...`` from the venv),
against the local PostgreSQL (a fresh, unmigrated database, so ``migrate`` really migrates), our own
Redis database and a moto S3 server holding a small Fashion-MNIST catalog. Only the published ports
are moved to free loopback ports. Then an operator's ``styletag retag --all --wait`` runs through
them and every product must come out tagged.

The helpers at the top (Proc, ports, scraping) are shared with the other tests in tests/ops.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from tests.conftest import _libpq, drop_pg_database, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REDIS_DB = 14
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
N_PRODUCTS = 200

pytestmark = pytest.mark.slow


# --- helpers shared by tests/ops --------------------------------------------------------------------


def service_env(**overrides: str) -> dict[str, str]:
    """This process's environment (boto3's AWS_* from the s3_server fixture, STYLETAG_MODEL if the
    developer set one) without settings a test must choose itself, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STYLETAG_", "FLOWER_", "CELERY_")) or k == "STYLETAG_MODEL"}
    env.update({"PYTHONUNBUFFERED": "1", "STYLETAG_METRICS_ADDR": "127.0.0.1", "STYLETAG_TORCH_THREADS": "1",
                "STYLETAG_FETCH_THREADS": "4"})
    env.update(overrides)
    return env


class Proc:
    """A service process of ours: output to files, stopped by SIGTERM (then SIGKILL of its group)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, *, split_stderr=False):
        self.name = name
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err" if split_stderr else self.out_path
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb") if split_stderr else subprocess.STDOUT
        self.proc = subprocess.Popen(argv, env=env, cwd=log_dir, stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    def text(self) -> str:
        out = self.out_path.read_text(errors="replace")
        return out if self.err_path == self.out_path else out + self.err_path.read_text(errors="replace")

    def err_text(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check(self.text()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {what} after {timeout}s:\n{self.text()[-3000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for fh in (self._out, self._err):
            if hasattr(fh, "close"):
                fh.close()
        return self.proc.returncode


def worker_ready(n: int):
    return lambda text: text.count(" ready.") >= n and text.count("model loaded") >= n


def http_get(url: str, timeout: float = 5.0, auth: str | None = None) -> str:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URLs we built
        return resp.read().decode()


def wait_http(url: str, timeout: float = 60.0, proc: Proc | None = None, auth: str | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url, auth=auth)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited:\n{proc.text()[-3000:]}") from exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not answering after {timeout}s: {exc}") from exc
            time.sleep(0.2)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def metric(parsed, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lb, v in parsed if n == name and all(lb.get(k) == val for k, val in labels.items()))


def has_metric(parsed, name: str, **labels: str) -> bool:
    return any(n == name and all(lb.get(k) == val for k, val in labels.items()) for n, lb, _ in parsed)


def enqueue_run_on(broker_url: str, settings, run_id: int, chunk: int) -> int:
    """The retag producer (worker.producers.retag.enqueue_run) sending to ``broker_url``: it publishes to the
    broker of the settings it is given, not to whatever this test process's Celery app was built with."""
    from dataclasses import replace

    from worker.producers.retag import enqueue_run

    return enqueue_run(replace(settings, broker_url=broker_url), run_id, chunk=chunk)


def wait_run_done(database_url: str, run_id: int, proc: Proc, timeout: float) -> None:
    """Wait until the run's status is ``done``; on time-out, fail with the end of ``proc``'s log."""
    from catalog.db import session_scope
    from catalog.runs import get_run

    deadline = time.monotonic() + timeout
    while True:
        with session_scope(database_url) as s:
            if get_run(s, run_id).status == "done":
                return
        assert time.monotonic() < deadline, proc.text()[-3000:]
        time.sleep(0.2)


def run_counts(database_url: str, run_id: int) -> dict[tuple[str, str | None], int]:
    """(status, reason) -> products of the run, from tag_state."""
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import TagState

    with session_scope(database_url) as s:
        rows = s.execute(select(TagState.status, TagState.reason, func.count()).where(TagState.run_id == run_id)
                         .group_by(TagState.status, TagState.reason)).all()
    return {(st, reason): n for st, reason, n in rows}


# --- the compose file's commands --------------------------------------------------------------------


def compose_argv(service: dict) -> list[str]:
    """What a service's container runs: its entrypoint (else the image's, ``styletag``) + its command."""
    def as_list(v):
        return [] if v is None else shlex.split(v) if isinstance(v, str) else [str(x) for x in v]

    entry = service.get("entrypoint")
    return (as_list(entry) if entry is not None else ["styletag"]) + as_list(service.get("command"))


def local_argv(argv: list[str], ports: dict[str, int]) -> list[str]:
    """The same command from our venv, with each published port moved to a free one."""
    exe, args = argv[0], list(argv[1:])
    assert exe in ("styletag", "celery"), argv
    out = []
    it = iter(args)
    for arg in it:
        m = re.fullmatch(r"(--(?:metrics-)?port)(=(\d+))?", arg)
        if m and m.group(1).lstrip("-") in ports:
            key = m.group(1).lstrip("-")
            if m.group(2) is None:  # "--port N": keep the form (tornado, behind flower, wants --port=N)
                next(it)
                out += [m.group(1), str(ports[key])]
            else:
                out.append(f"{m.group(1)}={ports[key]}")
        else:
            out.append(arg)
    return [str(BIN / exe), *out]


@pytest.fixture(scope="module")
def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


@pytest.fixture(scope="module")
def fresh_db(pg_base_url):
    """An empty, unmigrated PostgreSQL database: compose's ``migrate`` must build the schema."""
    import psycopg

    from catalog.db import engine_for

    name = f"styletag_smoke_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(pg_base_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{pg_base_url}/{name}"
    yield url
    engine_for(url).dispose()
    drop_pg_database(pg_base_url, name)


@pytest.fixture(scope="module")
def deployment(compose_services, fresh_db, s3_server, tmp_path_factory):
    """migrate, then worker-cpu, beat, metrics (and flower, when installed) as local processes."""
    from catalog.importers import import_fashion_mnist

    redis.Redis.from_url(BROKER_URL).flushdb()
    bucket = s3_server.make_bucket()
    home = tmp_path_factory.mktemp("smoke")
    env_example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    from worker.ops.launcher import cpu_bulk_procs

    # consecutive ports: the uploads process and each bulk pool process (one per core on a CPU host)
    worker_port, exporter_port, flower_port = free_port(1 + cpu_bulk_procs()), free_port(), free_port()
    flower_auth = f"admin:{uuid.uuid4().hex[:12]}"
    env = service_env(
        STYLETAG_DATABASE_URL=fresh_db, STYLETAG_BROKER_URL=BROKER_URL, STYLETAG_HOME=str(home / "home"),
        STYLETAG_STORE_URL=f"s3://{bucket}/products", STYLETAG_ALLOWED_IMAGE_PREFIXES=f"s3://{bucket}/products/",
        STYLETAG_NIGHTLY_CRON=env_example["STYLETAG_NIGHTLY_CRON"], STYLETAG_BATCH_SIZE="64",
        FLOWER_ADDRESS="127.0.0.1", FLOWER_BASIC_AUTH=flower_auth,
    )
    ports = {"metrics-port": worker_port, "port": exporter_port}
    argv = {name: local_argv(compose_argv(compose_services[name]), ports)
            for name in ("migrate", "worker-cpu", "beat", "metrics")}
    with_flower = importlib.util.find_spec("flower") is not None
    if with_flower:
        argv["flower"] = local_argv(compose_argv(compose_services["flower"]), {"port": flower_port})

    migrate = subprocess.run(argv["migrate"], env=env, cwd=home, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    report = import_fashion_mnist(fresh_db, env["STYLETAG_STORE_URL"], "test", limit=N_PRODUCTS, progress=False)
    assert report.inserted == N_PRODUCTS

    procs = {name: Proc(name, argv[name], env, home) for name in argv if name != "migrate"}
    try:
        procs["worker-cpu"].wait_for(worker_ready(2), 180, "two ready workers")
        wait_http(f"http://127.0.0.1:{exporter_port}/metrics", 60, procs["metrics"])
        procs["beat"].wait_for(lambda t: "nightly retag scheduled" in t, 60, "the nightly schedule line")
        if with_flower:
            wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", 60, procs["flower"], auth=flower_auth)
        yield {"env": env, "db": fresh_db, "procs": procs, "argv": argv, "worker_port": worker_port,
               "exporter_port": exporter_port, "flower_port": flower_port if with_flower else None,
               "flower_auth": flower_auth, "home": home}
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.stop()
        redis.Redis.from_url(BROKER_URL).flushdb()


def test_compose_commands_are_the_ones_started(deployment, compose_services):
    argv = deployment["argv"]
    assert argv["migrate"][1:] == ["db", "upgrade"]
    assert argv["worker-cpu"][1:4] == ["worker", "--gpus", "none"]
    assert argv["beat"][1:] == ["beat"]
    assert argv["metrics"][1:] == ["metrics", "--port", str(deployment["exporter_port"])]


def test_migrate_built_the_schema(deployment):
    from sqlalchemy import inspect

    from catalog.db import engine_for

    tables = set(inspect(engine_for(deployment["db"])).get_table_names())
    assert {"products", "tag_state", "tagging_runs", "product_styles", "alembic_version"} <= tables


def test_retag_through_the_compose_services_tags_every_product(deployment):
    from sqlalchemy import func, select

    from catalog.db import session_scope
    from catalog.schema import ProductStyle, StyleLabel, TagState

    proc = subprocess.run([str(BIN / "styletag"), "retag", "--all", "--wait", "--timeout", "120", "--json",
                           "--chunk", "50"], env=deployment["env"], cwd=deployment["home"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:] + deployment["procs"]["worker-cpu"].text()[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (run["status"], run["total"], run["done"], run["failed"]) == ("done", N_PRODUCTS, N_PRODUCTS, 0)
    with session_scope(deployment["db"]) as s:
        states = s.execute(select(TagState.status, TagState.run_id, func.count()).group_by(TagState.status,
                                                                                           TagState.run_id)).all()
        primaries = s.execute(select(StyleLabel.level, func.count()).join(ProductStyle,
                              ProductStyle.label_id == StyleLabel.id).where(ProductStyle.is_primary)
                              .group_by(StyleLabel.level)).all()
    assert states == [("tagged", run["id"], N_PRODUCTS)]
    assert dict(primaries) == {"coarse": N_PRODUCTS, "fine": N_PRODUCTS}
    deployment["run"] = run


def test_each_worker_process_serves_its_metrics(deployment):
    from worker.ops.launcher import cpu_bulk_procs

    port = deployment["worker_port"]
    # the uploads process on the first port, then one per bulk pool process (one per core on a CPU host)
    uploads = samples(http_get(f"http://127.0.0.1:{port}/metrics"))
    bulk = [samples(http_get(f"http://127.0.0.1:{port + 1 + i}/metrics")) for i in range(cpu_bulk_procs())]
    assert has_metric(uploads, "styletag_model_info", queue="uploads", gpu="none")
    assert all(has_metric(b, "styletag_model_info", queue="bulk", gpu="none") for b in bulk)
    tagged = metric(uploads, "styletag_products_tagged_total") + sum(metric(b, "styletag_products_tagged_total")
                                                                     for b in bulk)
    assert tagged == N_PRODUCTS


def test_exporter_reports_empty_queues_after_the_run(deployment):
    parsed = samples(http_get(f"http://127.0.0.1:{deployment['exporter_port']}/metrics"))
    assert has_metric(parsed, "styletag_queue_depth", queue="bulk")
    assert has_metric(parsed, "styletag_queue_depth", queue="uploads")
    assert metric(parsed, "styletag_queue_depth") == 0
    assert metric(parsed, "styletag_broker_up") == 1 and metric(parsed, "styletag_database_up") == 1
    assert not has_metric(parsed, "styletag_run_products")  # the run finished


def test_beat_runs_with_the_configured_nightly_cron(deployment):
    beat = deployment["procs"]["beat"]
    assert beat.proc.poll() is None
    cron = deployment["env"]["STYLETAG_NIGHTLY_CRON"]
    assert f"nightly retag scheduled: cron {cron!r}" in beat.text()


def test_flower_sees_both_workers(deployment):
    if deployment["flower_port"] is None:
        pytest.skip("flower is not installed (pip install flower): the compose file's flower service not tried")
    url = f"http://127.0.0.1:{deployment['flower_port']}"
    with pytest.raises(urllib.error.HTTPError) as denied:  # FLOWER_BASIC_AUTH from the environment protects it
        http_get(url + "/api/workers")
    assert denied.value.code == 401
    workers = json.loads(http_get(url + "/api/workers?refresh=1", timeout=20, auth=deployment["flower_auth"]))
    names = {n.split("@")[0] for n in workers}
    assert {"uploads-cpu", "bulk-cpu"} <= names, workers.keys()


def test_services_stop_cleanly(deployment):
    procs = deployment["procs"]
    for p in procs.values():
        p.terminate()
    for name in ("worker-cpu", "beat", "metrics"):
        code = procs[name].stop(timeout=60)
        assert code in (0, -signal.SIGTERM), f"{name} exited {code}:\n{procs[name].text()[-2000:]}"
    assert "Traceback" not in procs["worker-cpu"].text()
