"""Decoder processes under a real Celery worker (prefork child) serving a photo model, on PostgreSQL + Redis.

A Celery pool child is a daemonic process, from which multiprocessing refuses to start children; the decode
pool lifts that (``worker.decode_pool._allow_children``) and its decoders watch their parent instead. Shown
here: a retag of a photo catalog through the worker tags every photo (one unreadable file fails alone with
its reason), the decoder processes start with the model (before the first image) under the pool child, and
they exit by themselves when the worker is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import truncate_all
from tests.support.photo_model import photo_checkpoint
from tests.support.worker import WorkerProcess, run_cli
from tests.worker.test_decode_pool import _alive, _photo

N = 48


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        tree += kids
        todo += kids
    return tree


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def photo_env(worker_env, tmp_path, pg_url):
    store = tmp_path / "store"
    store.mkdir()
    rows = ["sku,image_uri,title"]
    for i in range(N + 1):
        data = b"\x89PNG but not really" if i == N else _photo(500 + i)
        (store / f"ph{i}.jpg").write_bytes(data)
        rows.append(f"ph{i},{(store / f'ph{i}.jpg').as_uri()},photo {i}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    model = tmp_path / "photo.safetensors"
    photo_checkpoint(model, seed=4, colour={"max_colours": 2, "min_share": 0.25})
    truncate_all(pg_url)
    env = {**worker_env, "STYLETAG_STORE_URL": store.as_uri(), "STYLETAG_ALLOWED_IMAGE_PREFIXES": store.as_uri() + "/",
           "STYLETAG_MODEL": str(model), "STYLETAG_DECODE_PROCS": "2", "STYLETAG_BATCH_SIZE": "16"}
    proc = run_cli(env, "import", "catalog", str(tmp_path / "c.csv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    yield env
    truncate_all(pg_url)


def test_a_celery_worker_decodes_photos_in_decoder_processes(photo_env, tmp_path):
    w = WorkerProcess(photo_env, tmp_path / "worker.log", queues="bulk")
    decoders: list[int] = []
    try:
        w.wait_ready(1)
        # started with the model, before any image: the first upload does not wait for them
        assert any("spawn_main" in _cmdline(d) for d in _tree(w.proc.pid)), w.text()[-2000:]
        proc = run_cli(photo_env, "retag", "--all", "--wait", "--timeout", "240", "--json")
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], w.text()[-3000:])
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (run["done"], run["failed"]) == (N, 1), (run, w.text()[-3000:])
        assert "daemonic" not in w.text().replace("decoder processes from a daemonic", "")

        # launcher -> Celery main -> pool child -> decoders (spawned: their command line says so)
        tree = _tree(w.proc.pid)
        decoders = [d for d in tree if "multiprocessing" in _cmdline(d)]
        assert decoders, [(d, _cmdline(d)) for d in tree]
        assert any("spawn_main" in _cmdline(d) for d in decoders)

        # SIGKILL the worker's processes, not their process group: the decoders must go by themselves
        for pid in [w.proc.pid, *(d for d in tree if d not in decoders)]:
            os.kill(pid, signal.SIGKILL)
        w.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(_alive(d) for d in decoders) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(d) for d in decoders), "decoder processes outlived the SIGKILLed worker"
    finally:
        w.stop(signal.SIGKILL)
        for d in decoders:
            if _alive(d):
                os.kill(d, signal.SIGKILL)
