"""Issue 15, items 1, 8 and 9, against one real ``styletag worker --gpus none`` (launcher, an uploads and a
bulk Celery process) on a private redis-server and a SQLite catalog.

Item 1. Raw items pushed into the queues' Redis lists (``redis-cli lpush bulk '{{{ not json'`` and the
like) stopped the consuming Celery process for good ("Unrecoverable error: JSONDecodeError"), and the
launcher kept running with the dead child; a SIGKILL of the uploads process left uploads untagged. Now
each malformed item is dead-lettered (Redis list ``styletag:dead-letter``, a count per queue and reason,
one log line) and both consumers go on; a killed process is restarted and serves the next upload.

Item 8. ``uploads`` was bound to exchange ``bulk`` with key ``bulk``: a message published there ran on both
queues. Each queue now has its own exchange; a binding an older version left in Redis is removed when
the worker starts.

Item 9. The upload latency histogram (enqueue → tags committed), an images counter instead of an
images-per-second gauge, no ``stage="wall"``, no ``_created`` series, and an exporter that serves only
deployment metrics (dead-lettered items among them).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace

import pytest

from catalog.settings import Settings
from tests.conftest import free_port
from tests.support.redis_server import RedisServer
from tests.support.worker import WorkerProcess, run_cli, wait_until

N = 30
SEP = "\x06\x16"  # kombu's Redis binding separator
STALE_BINDING = f"bulk{SEP}{SEP}uploads"  # what an older styletag left: uploads bound to bulk/bulk


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from catalog.importers import import_fashion_mnist
    from catalog.migrate import upgrade

    root = tmp_path_factory.mktemp("malformed")
    server = RedisServer(root).start()
    db = f"sqlite:///{root / 'catalog.db'}"
    store = root / "images"
    upgrade(db)
    import_fashion_mnist(db, store.as_uri(), "test", limit=N, progress=False)
    server.client().sadd("_kombu.binding.bulk", STALE_BINDING)
    port = free_port()
    env = {"STYLETAG_DATABASE_URL": db, "STYLETAG_BROKER_URL": server.url, "STYLETAG_STORE_URL": store.as_uri(),
           "STYLETAG_ALLOWED_IMAGE_PREFIXES": store.as_uri() + "/", "STYLETAG_HOME": str(root),
           "STYLETAG_TORCH_THREADS": "1", "STYLETAG_UPLOAD_BATCH": "8", "STYLETAG_UPLOAD_INTERVAL": "0.25",
           "PYTHONUNBUFFERED": "1"}
    worker = WorkerProcess(env, root / "worker.log", extra_args=("--metrics-port", str(port)))
    try:
        worker.wait_ready(2)
        yield {"env": env, "db": db, "redis": server, "worker": worker, "metrics_port": port,
               "settings": replace(Settings.from_env(), database_url=db, broker_url=server.url)}
    finally:
        worker.stop()
        server.kill()


def _tagged(db: str, pid: int) -> bool:
    from catalog.db import session_scope
    from catalog.schema import TagState

    with session_scope(db) as s:
        st = s.get(TagState, pid)
        return st is not None and st.status == "tagged"


def _sku(db: str, pid: int) -> str:
    from catalog.db import session_scope
    from catalog.schema import Product

    with session_scope(db) as s:
        return s.get(Product, pid).sku


def _producer(stack):
    from worker.app import make_app

    return make_app(stack["settings"])


def _envelope(body: str | None, *, task: object = "styletag.tag_products", routing_key: str = "bulk",
              **props) -> bytes:
    """A kombu Redis envelope as a producer writes it (every field the consumer reads)."""
    properties = {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "priority": 0, "delivery_mode": 2,
                  "delivery_info": {"exchange": routing_key, "routing_key": routing_key}, **props}
    payload = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"task": task, "id": str(uuid.uuid4()), "lang": "py", "argsrepr": "", "kwargsrepr": ""},
               "properties": {k: v for k, v in properties.items() if v is not None}}
    return json.dumps(payload).encode()


def _b64(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


MALFORMED = [  # (queue, raw item, reason it is dead-lettered for)
    ("bulk", b"{{{ not json", "not_json"),
    ("bulk", b"[1,2,3]", "not_an_envelope"),
    ("uploads", b"{{{", "not_json"),
    ("bulk", b"\xff\xfe not utf-8", "not_utf8"),
    ("uploads", _envelope("!!!not base64", task="styletag.tag_uploads", routing_key="uploads"), "bad_body"),
    ("bulk", _envelope(_b64([[None, [1]], {}, {}]), delivery_info=None), "not_an_envelope"),
    ("uploads", _envelope(_b64([[1], {}, {}]), task=["a", "list"], routing_key="uploads"), "not_an_envelope"),
    ("bulk", _envelope(_b64("rm -rf /")), "malformed_task"),  # a good envelope, a body that is not a task's
]


def test_a_stale_binding_is_removed_and_each_exchange_reaches_its_own_queue_only(stack):
    client, worker = stack["redis"].client(), stack["worker"]
    assert "removed 1 stale queue binding(s) left by an older styletag" in worker.text()
    bindings = {ex: sorted(m.decode() for m in client.smembers(f"_kombu.binding.{ex}")) for ex in ("bulk", "uploads")}
    assert bindings == {"bulk": [f"bulk{SEP}{SEP}bulk"], "uploads": [f"uploads{SEP}{SEP}uploads"]}, bindings
    # `celery call styletag.tag_products --exchange bulk --routing-key bulk`: received by one node only
    task_id = f"bound-{uuid.uuid4()}"
    _producer(stack).send_task("styletag.tag_products", args=(None, [1, 2]), exchange="bulk", routing_key="bulk",
                               task_id=task_id)
    wait_until(lambda: f"[{task_id}] succeeded" in worker.text(), timeout=90)
    time.sleep(2)  # a second delivery, if any, would run at once on the idle uploads process
    assert worker.text().count(f"styletag.tag_products[{task_id}] received") == 1
    assert _tagged(stack["db"], 1) and _tagged(stack["db"], 2)


def test_malformed_items_are_dead_lettered_and_both_queues_go_on(stack):
    from worker.messages import DEAD_LETTER_COUNTS_KEY, DEAD_LETTER_KEY

    client, worker, db = stack["redis"].client(), stack["worker"], stack["db"]
    for queue, raw, _reason in MALFORMED:
        client.lpush(queue, raw)
    wait_until(lambda: client.llen(DEAD_LETTER_KEY) >= len(MALFORMED), timeout=60)
    # then real work on both queues, after the malformed items
    _producer(stack).send_task("styletag.tag_products", args=(None, [3, 4, 5]), queue="bulk")
    proc = run_cli(stack["env"], "enqueue", _sku(db, 6), timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: all(_tagged(db, pid) for pid in (3, 4, 5, 6)), timeout=90)

    entries = [json.loads(e) for e in client.lrange(DEAD_LETTER_KEY, 0, -1)][::-1]  # oldest first
    assert len(entries) == len(MALFORMED)
    got = Counter((e["queue"], e["reason"]) for e in entries)
    assert got == Counter((q, r) for q, _, r in MALFORMED), got
    bodies = {e["body"] for e in entries}
    assert "{{{ not json" in bodies and "[1,2,3]" in bodies and "{{{" in bodies
    counts = {k.decode(): int(v) for k, v in client.hgetall(DEAD_LETTER_COUNTS_KEY).items()}
    assert counts == {f"{q}:{r}": n for (q, r), n in Counter((q, r) for q, _, r in MALFORMED).items()}

    log = worker.text()
    assert log.count("dropped a malformed item from queue") == len(MALFORMED)
    assert "Unrecoverable error" not in log and "restarting it in" not in log
    assert log.count(" ready.") == 2 and worker.proc.poll() is None


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(parsed, name: str, **labels) -> float:
    return sum(v for (n, ls), v in parsed.items() if n == name and set(labels.items()) <= ls)


def test_exporter_counts_dead_letters_and_serves_deployment_metrics_only(stack):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from worker.ops.metrics import exporter_registry

    text = generate_latest(exporter_registry(stack["settings"])).decode()
    parsed = {(s.name, frozenset(s.labels.items())): s.value
              for fam in text_string_to_metric_families(text) for s in fam.samples}
    for (queue, reason), n in Counter((q, r) for q, _, r in MALFORMED).items():
        assert _value(parsed, "styletag_messages_dead_lettered_total", queue=queue, reason=reason) == n
    assert _value(parsed, "styletag_dead_letter_messages") == len(MALFORMED)
    names = {n for n, _ in parsed}
    assert not {n for n in names if not n.startswith("styletag_")}, names  # no process_* / python_* here
    assert not {"styletag_products_tagged_total", "styletag_model_info"} & names  # no worker metric at zero
    assert "_created" not in text


def test_worker_metrics_follow_prometheus_conventions_and_time_uploads(stack):
    """The uploads process (its port) after the uploads above: latency histogram observed once per upload
    tagged, images counter, no 'wall' stage, no *_created."""
    port = stack["metrics_port"]
    wait_until(lambda: _value(_scrape(f"http://127.0.0.1:{port}/metrics"), "styletag_upload_latency_seconds_count"),
               timeout=30)
    parsed = _scrape(f"http://127.0.0.1:{port}/metrics")
    n_uploads = _value(parsed, "styletag_upload_latency_seconds_count")
    assert n_uploads >= 1
    assert 0 < _value(parsed, "styletag_upload_latency_seconds_sum") < 60 * n_uploads
    assert _value(parsed, "styletag_upload_latency_seconds_bucket", le="+Inf") == n_uploads
    assert _value(parsed, "styletag_images_total") == _value(parsed, "styletag_batch_size_sum") > 0
    names = {n for n, _ in parsed}
    assert "styletag_images_per_second" not in names and not any(n.endswith("_created") for n in names)
    stages = {dict(ls).get("stage") for n, ls in parsed if n == "styletag_stage_seconds_count"}
    assert stages == {"fetch", "decode", "model", "write"}, stages
    assert _value(parsed, "styletag_batch_seconds_count") == _value(parsed, "styletag_batch_size_count")
    assert not {"styletag_queue_depth", "styletag_run_products"} & names  # the exporter's, not a worker's


def test_health_checks_ping_the_workers_nodes_and_check_beat(stack, tmp_path):
    """What docker-compose.yml's health checks run (item 10): the worker's own options plus --health."""
    ok = run_cli(stack["env"], "worker", "--gpus", "none", "--queues", "uploads,bulk", "--health", timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: uploads-cpu@"), (ok.stdout, ok.stderr)
    missing = run_cli(stack["env"], "worker", "--gpus", "7", "--queues", "bulk", "--health", timeout=60)
    assert missing.returncode == 1 and "no answer from bulk-gpu7@" in missing.stderr, missing.stderr
    schedule = tmp_path / "celerybeat-schedule"
    beat = run_cli(stack["env"], "beat", "--health", "--schedule-file", str(schedule), timeout=60)
    assert beat.returncode == 1 and "beat has not started" in beat.stderr, beat.stderr
    schedule.with_suffix(".db").write_bytes(b"")
    beat = run_cli(stack["env"], "beat", "--health", "--schedule-file", str(schedule), timeout=60)
    assert beat.returncode == 0 and "broker answers" in beat.stdout, beat.stderr
    closed = {**stack["env"], "STYLETAG_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    beat = run_cli(closed, "beat", "--health", "--schedule-file", str(schedule), timeout=60)
    assert beat.returncode == 1 and "unreachable" in beat.stderr, beat.stderr


def _child_pid(launcher_pid: int, queue: str) -> int:
    """The launcher's Celery process for ``queue`` (from /proc: its children and their argv)."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    pids = [int(c) for c in children if ["-Q", queue] == _argv(c)[_argv(c).index("-Q"):][:2]]
    assert len(pids) == 1, {c: _argv(c) for c in children}
    return pids[0]


def _argv(pid: str) -> list[str]:
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
    except FileNotFoundError:
        return ["-Q"]
    return argv if "-Q" in argv else ["-Q"]


def test_sigkill_of_the_uploads_process_restarts_it_and_uploads_are_tagged(stack):
    worker, db = stack["worker"], stack["db"]
    ready_before = worker.text().count(" ready.")
    pid = _child_pid(worker.proc.pid, "uploads")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "uploads-cpu@" in worker.text() and "was killed by SIGKILL; restarting it in" in worker.text(),
               timeout=30)
    wait_until(lambda: worker.text().count(" ready.") > ready_before, timeout=240, interval=0.5)
    new_pid = _child_pid(worker.proc.pid, "uploads")
    assert new_pid != pid and worker.proc.poll() is None
    proc = run_cli(stack["env"], "enqueue", _sku(db, 7), timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: _tagged(db, 7), timeout=120, interval=0.3)
    replies = _producer(stack).control.ping(timeout=3)
    nodes = {name.split("@")[0] for reply in replies for name in reply}
    assert nodes == {"uploads-cpu", "bulk-cpu"}, replies
