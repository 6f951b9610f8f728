"""The model lifecycle through a real ``styletag worker`` (Celery) on PostgreSQL, Redis and a file store,
each step a command of the rollout recipe in docs/operations.md:

register → retag --shadow → model compare → activate → retag --changed-only; rollback → retag --changed-only.

The tests of this module share one worker and one catalog (two real checkpoints: the shipped
``fmnist-resnet-small`` and ``fmnist-resnet-wide``, and a re-saved copy of the small one with review
thresholds) and run in file order.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import time
from dataclasses import replace

import numpy as np
import pytest
import redis
from sqlalchemy import text

from catalog.db import engine_for, session_scope
from model.weights import DEFAULT_CHECKPOINT, WIDE_CHECKPOINT
from tests.conftest import truncate_all
from tests.worker.conftest import WorkerProcess, run_cli, wait_until

pytestmark = pytest.mark.slow

N = 120
SMALL, WIDE = "5186c090c00e9b02", "8f68fa38e0719420"  # the shipped checkpoints' versions (format 1)
REVIEW_THRESHOLD, OOD_THRESHOLD = 0.93, 0.6
BLANK_GREYS = (112, 128, 144, 160)  # flat grey squares, "a photo of nothing": the small model's score 0.44-0.51
N_BLANK = len(BLANK_GREYS)


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory):
    """A private redis-server for this module (overrides the shared test database 11): no other test
    session's worker takes our messages, and ours takes none of theirs."""
    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def lc_catalog(apply_env, pg_url):
    from catalog.importers import import_fashion_mnist

    truncate_all(pg_url)
    import_fashion_mnist(pg_url, apply_env["STYLETAG_STORE_URL"], "test", limit=N, progress=False)
    return pg_url


@pytest.fixture(scope="module")
def lc_worker(lc_catalog, apply_env, tmp_path_factory):
    w = WorkerProcess(apply_env, tmp_path_factory.mktemp("lc-worker") / "worker.log")
    try:
        w.wait_ready(2)
    except BaseException:
        w.stop(signal.SIGKILL)
        raise
    yield w
    w.stop()


@pytest.fixture(scope="module")
def review_checkpoint(tmp_path_factory):
    """The small model's weights re-saved with a review and an out-of-distribution threshold: format 2, so
    the same weights are another model (another version)."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    path = tmp_path_factory.mktemp("ckpt") / "small-review.safetensors"
    version = save_checkpoint(path, state, {**meta, "review_threshold": REVIEW_THRESHOLD,
                                            "ood_threshold": OOD_THRESHOLD})
    assert version not in (SMALL, WIDE)
    return path, version


def ok(env, *args, timeout=300):
    proc = run_cli(env, *args, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc


def js(env, *args, timeout=300):
    """A command's JSON: the whole stdout (catalog commands indent it), else its last line (retag)."""
    out = ok(env, *args, "--json", timeout=timeout).stdout.strip()
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])


def retag(env, *args):
    return js(env, "retag", *args, "--wait", "--timeout", "300")


def q(url, sql, **params):
    with engine_for(url).connect() as conn:
        return conn.execute(text(sql), params).all()


def versions(url):
    """(model versions of the model rows, of tag_state, of what the storefront shows)."""
    return ({r[0] for r in q(url, "SELECT DISTINCT model_version FROM product_styles WHERE source = 'model'")},
            {r[0] for r in q(url, "SELECT DISTINCT model_version FROM tag_state")},
            {r[0] for r in q(url, "SELECT DISTINCT model_version FROM storefront_tags")})


def task_lines(worker, run_id):
    return [dict(re.findall(r"(\w+)=(\S+)", line.split("tag_products", 1)[1]))
            for line in worker.text().splitlines() if f"tag_products run={run_id} " in line]


# --- register, shadow, compare, activate, roll back -----------------------------------------------------


def test_rollout_and_rollback_put_every_products_tags_back(lc_worker, apply_env, lc_catalog):
    env, url = apply_env, lc_catalog
    first = retag(env, "--all")
    assert (first["status"], first["written"], first["failed"], first["model_version"]) == ("done", N, 0, SMALL)

    reg = js(env, "model", "register", str(WIDE_CHECKPOINT))
    assert (reg["version"], reg["status"], reg["path"]) == (WIDE, "shadow", "builtin:fmnist-resnet-wide.safetensors")
    shadow = retag(env, "--shadow", WIDE)
    assert (shadow["kind"], shadow["status"], shadow["written"], shadow["model_version"]) == ("shadow", "done", N, WIDE)
    assert versions(url) == ({SMALL}, {SMALL}, {SMALL})  # the storefront never saw the shadow model
    assert q(url, "SELECT count(DISTINCT product_id) FROM shadow_tags WHERE model_version = :v", v=WIDE)[0][0] == N

    cmp = js(env, "model", "compare", WIDE)
    for level in ("coarse", "fine"):
        n, agree, cur_ok, new_ok, with_truth = q(url, """
            SELECT count(*), count(*) FILTER (WHERE c.label_id = s.label_id),
                   count(*) FILTER (WHERE t.label_id = c.label_id), count(*) FILTER (WHERE t.label_id = s.label_id),
                   count(t.label_id)
            FROM product_styles c JOIN style_labels lc ON lc.id = c.label_id AND lc.level = :lv
            JOIN shadow_tags s ON s.product_id = c.product_id AND s.is_primary AND s.model_version = :v
            JOIN style_labels ls ON ls.id = s.label_id AND ls.level = :lv
            LEFT JOIN (style_truth t JOIN style_labels lt ON lt.id = t.label_id AND lt.level = :lv)
                   ON t.product_id = c.product_id
            WHERE c.is_primary AND c.source = 'model'""", v=WIDE, lv=level)[0]
        got = cmp["levels"][level]
        assert (got["compared"], got["agree"], got["correct_current"], got["correct_shadow"], got["with_truth"]) == (
            n, agree, cur_ok, new_ok, with_truth), level
        assert n == with_truth == N and sum(f["products"] for f in got["flips"]) == n - agree
    fine = cmp["levels"]["fine"]
    assert 0.8 < fine["agreement"] < 1.0 and fine["accuracy_current"] > 0.85 and fine["accuracy_shadow"] > 0.85
    print(f"\ncompare small -> wide on {N}: fine agree {fine['agree']}, accuracy {fine['correct_current']} -> "
          f"{fine['correct_shadow']}, coarse agree {cmp['levels']['coarse']['agree']}")

    act = js(env, "model", "activate", WIDE)
    assert (act["active"]["version"], act["replaced"]) == (WIDE, SMALL)
    second = retag(env, "--changed-only")
    assert (second["written"], second["total"], second["model_version"]) == (N, N, WIDE)
    assert versions(url) == ({WIDE}, {WIDE}, {WIDE})

    back = js(env, "model", "rollback")
    assert (back["active"]["version"], back["replaced"]) == (SMALL, WIDE)
    third = retag(env, "--changed-only")
    assert (third["written"], third["total"], third["failed"], third["skipped"]) == (N, N, 0, 0)
    assert versions(url) == ({SMALL}, {SMALL}, {SMALL})  # every product carries v1's tags again
    assert retag(env, "--changed-only")["total"] == 0  # and nothing is left to re-send

    # Reports count what each run wrote, whatever later runs did to the same products.
    for run, want in ((first, N), (second, N), (third, N)):
        report = js(env, "report", str(run["id"]))
        assert (report["counts"]["written"], report["counts"]["failed"]) == (want, 0), run["id"]
    listed = js(env, "model", "list")
    assert [(m["version"], m["status"]) for m in listed] == [(SMALL, "active"), (WIDE, "shadow")]
    assert listed[0]["activated_by"] != "bootstrap" and listed[0]["activation_seq"] == 3


def test_a_run_is_written_by_its_own_model_only(lc_worker, apply_env, lc_catalog):
    """The issue: a retag started with a new STYLETAG_MODEL while the worker ran the old one was recorded as
    one model and written by another. Now the run records the registry's active model and the worker writes
    it with that model; a run of a model that is not active writes nothing at all."""
    from catalog.runs import create_run, get_run, run_as_dict
    from catalog.settings import Settings
    from worker.producers.retag import enqueue_run

    env, url = apply_env, lc_catalog
    run = retag({**env, "STYLETAG_MODEL": str(WIDE_CHECKPOINT)}, "--all")
    assert (run["model_version"], run["written"]) == (SMALL, N)
    assert q(url, "SELECT DISTINCT model_version, run_id FROM tag_state") == [(SMALL, run["id"])]

    # A run of the shadow (not active) model, as a straggling producer would make it: never written.
    before = q(url, "SELECT product_id, model_version, attempts FROM tag_state ORDER BY 1")
    with session_scope(url) as s:
        stray = create_run(s, "manual", "all", WIDE).id
    sent = enqueue_run(Settings.from_env(), stray, chunk=64)
    assert sent == N
    def all_logged():
        lines = task_lines(lc_worker, stray)
        return lines if sum(int(x["batch_size"]) for x in lines) >= N else None

    lines = wait_until(all_logged, timeout=180)
    assert sum(int(x["stale"]) for x in lines) == N and sum(int(x["tagged"]) for x in lines) == 0
    assert {x["model"] for x in lines} == {WIDE}  # the worker ran the run's model, and the writer refused it
    with session_scope(url) as s:
        info = run_as_dict(get_run(s, stray))
    assert (info["written"], info["failed"], info["skipped"], info["review"]) == (0, 0, 0, 0)
    assert q(url, "SELECT product_id, model_version, attempts FROM tag_state ORDER BY 1") == before
    assert versions(url) == ({SMALL}, {SMALL}, {SMALL})
    with session_scope(url) as s:
        from catalog.runs import cancel_run

        cancel_run(s, stray)


# --- people ---------------------------------------------------------------------------------------------


def test_a_manual_override_survives_retag_all_a_model_change_and_a_rollback(lc_worker, apply_env, lc_catalog):
    env, url = apply_env, lc_catalog
    sku, pid = q(url, "SELECT p.sku, p.id FROM storefront_tags v JOIN products p ON p.id = v.product_id "
                      "WHERE v.level = 'fine' AND v.is_primary AND v.style <> 'trouser' ORDER BY p.id LIMIT 1")[0]
    out = ok(env, "tags", "set", sku, "--level", "fine", "--style", "trouser", "--by", "ann").stdout
    assert "fine = trouser, coarse = bottoms (by ann)" in out

    def storefront():
        return q(url, "SELECT level, style, source FROM storefront_tags WHERE product_id = :p AND is_primary "
                      "ORDER BY level", p=pid)

    want = [("coarse", "bottoms", "manual"), ("fine", "trouser", "manual")]
    assert storefront() == want
    assert retag(env, "--all")["written"] == N
    assert storefront() == want
    ok(env, "model", "activate", WIDE)
    assert retag(env, "--changed-only")["written"] == N
    assert storefront() == want
    ok(env, "model", "rollback")
    assert retag(env, "--changed-only")["written"] == N
    assert storefront() == want
    shown = json.loads(ok(env, "tags", sku, "--json").stdout)
    manual = [(t["level"], t["style"], t["published"], t["set_by"]) for t in shown["tags"] if t["source"] == "manual"]
    assert manual == [("coarse", "bottoms", True, "ann"), ("fine", "trouser", True, "ann")]
    assert {t["model_version"] for t in shown["tags"] if t["source"] == "model"} == {SMALL}
    assert not [t for t in shown["tags"] if t["source"] == "model" and t["published"]
                and t["level"] in ("coarse", "fine")]
    assert q(url, "SELECT l.level, l.name, t.source FROM style_truth t JOIN style_labels l ON l.id = t.label_id "
                  "WHERE t.product_id = :p ORDER BY 1", p=pid) == [("coarse", "bottoms", "manual"),
                                                                  ("fine", "trouser", "manual")]
    ok(env, "tags", "clear", sku, "--level", "fine")
    assert storefront()[0] == ("coarse", "bottoms", "manual") and storefront()[1][2] == "model"
    ok(env, "tags", "clear", sku)
    assert {r[2] for r in storefront()} == {"model"}


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG")
    return buf.getvalue()


def test_unsure_and_out_of_distribution_products_wait_for_review(lc_worker, apply_env, lc_catalog, store_dir,
                                                                 review_checkpoint):
    from catalog.schema import Product
    from catalog.settings import Settings
    from worker.ops.metrics import DeploymentCollector

    env, url = apply_env, lc_catalog
    (store_dir / "blank").mkdir(exist_ok=True)
    with session_scope(url) as s:
        for i, grey in enumerate(BLANK_GREYS):
            path = store_dir / "blank" / f"{i}.png"
            path.write_bytes(_png(np.full((28, 28), grey, np.uint8)))
            s.add(Product(sku=f"blank-{i}", title="an empty photo", image_uri=path.as_uri(), image_version=f"b{i}"))
    path, version = review_checkpoint
    reg = js(env, "model", "register", str(path), "--activate")
    assert (reg["version"], reg["status"], reg["review_threshold"]) == (version, "active", REVIEW_THRESHOLD)
    run = retag(env, "--changed-only")
    assert (run["written"], run["total"], run["model_version"]) == (N + N_BLANK, N + N_BLANK, version)

    rows = q(url, "SELECT p.sku, t.status, t.reason, t.confidence FROM tag_state t JOIN products p "
                  "ON p.id = t.product_id")
    held = {r.sku: (r.reason, r.confidence) for r in rows if r.status == "review"}
    assert {r.sku for r in rows if r.confidence < REVIEW_THRESHOLD} == set(held)
    assert all((c < OOD_THRESHOLD) == (reason == "out_of_distribution") for reason, c in held.values())
    assert {f"blank-{i}" for i in range(N_BLANK)} <= {s for s, (reason, _) in held.items()
                                                      if reason == "out_of_distribution"}
    assert N_BLANK < len(held) < N // 4, len(held)
    assert run["review"] == len(held)
    shown = {r[0] for r in q(url, "SELECT DISTINCT sku FROM storefront_tags")}
    assert not shown & set(held) and len(shown) == N + N_BLANK - len(held)

    queue = js(env, "review", "list", "--limit", "500")
    assert queue["size"] == len(held) and {i["sku"] for i in queue["items"]} == set(held)
    assert [i["confidence"] for i in queue["items"]] == sorted(held[k][1] for k in held)  # least confident first
    assert all(i["image_uri"].startswith("file://") for i in queue["items"])
    report = js(env, "report", str(run["id"]))
    assert (report["counts"]["review"], report["counts"]["review_queue"]) == (len(held), len(held))
    gauges = {m.name: m.samples for m in DeploymentCollector(Settings.from_env()).collect()}
    assert gauges["styletag_review_queue"][0].value == len(held)

    # A person accepts two (published, and they become training labels) and corrects one.
    garment_held = sorted(k for k in held if not k.startswith("blank-"))
    accepted, corrected = garment_held[:2], garment_held[2] if len(garment_held) > 2 else "blank-0"
    out = js(env, "review", "accept", *accepted)
    assert out == {"accepted": accepted, "not_in_review": []}
    ok(env, "tags", "set", corrected, "--level", "fine", "--style", "bag")
    shown = {r[0] for r in q(url, "SELECT DISTINCT sku FROM storefront_tags")}
    assert set(accepted) | {corrected} <= shown
    assert {r[0] for r in q(url, "SELECT DISTINCT t.source FROM style_truth t JOIN products p ON p.id = t.product_id "
                                 "WHERE p.sku = ANY(:s)", s=accepted)} == {"review"}
    assert js(env, "review", "list")["size"] == len(held) - 3
    # Retagged by the same model, the accepted ones are not sent back to review: a person confirmed them.
    again = retag(env, "--all")
    assert again["review"] == len(held) - 3
    assert q(url, "SELECT count(*) FROM tag_state t JOIN products p ON p.id = t.product_id "
                  "WHERE p.sku = ANY(:s) AND t.status = 'tagged'", s=[*accepted, corrected])[0][0] == 3


def test_a_stale_message_of_a_superseded_or_finished_run_changes_no_counter(lc_worker, apply_env, lc_catalog):
    from catalog.runs import create_run, mark_running
    from worker.tasks import tag_products

    env, url = apply_env, lc_catalog
    ids = [r[0] for r in q(url, "SELECT id FROM products ORDER BY id LIMIT 100")]
    active = js(env, "model", "list")[0]["version"]
    with session_scope(url) as s:
        superseded = create_run(s, "manual", "all", active).id
        mark_running(s, superseded, total=N)
    ok(env, "model", "rollback")  # the run's model is replaced: the run is cancelled
    finished = q(url, "SELECT max(id) FROM tagging_runs WHERE status = 'done' AND kind = 'manual'")[0][0]

    def snapshot():
        return (q(url, "SELECT id, status, total, done, failed, skipped, review FROM tagging_runs ORDER BY id"),
                q(url, "SELECT run_id, reason, count FROM run_failure_counts ORDER BY 1, 2"),
                q(url, "SELECT product_id, status, model_version, run_id, attempts FROM tag_state ORDER BY 1"),
                q(url, "SELECT product_id, label_id, score, model_version, published FROM product_styles ORDER BY 1, 2"))

    before = snapshot()
    assert [r.status for r in before[0] if r.id == superseded] == ["cancelled"]
    # the finished run's own batches logged lines already: wait for two more of each run's
    seen = {run_id: len(task_lines(lc_worker, run_id)) for run_id in (superseded, finished)}
    for run_id in (superseded, finished):
        for _ in range(2):
            tag_products.apply_async(args=(run_id, ids))
    for run_id in (superseded, finished):
        lines = wait_until(lambda r=run_id: len(task_lines(lc_worker, r)) >= seen[r] + 2 and task_lines(lc_worker, r),
                           timeout=60)
        assert [(x["stale"], x["tagged"], x["failed"]) for x in lines[seen[run_id]:]] == [("100", "0", "0")] * 2
    assert snapshot() == before


# --- a worker without a model (issue 15, item 2) ---------------------------------------------------------


def test_a_worker_without_its_model_consumes_nothing_and_loses_nothing(pg_new_database, apply_env, tmp_path,
                                                                       review_checkpoint):
    """STYLETAG_MODEL names a checkpoint that is not there: the worker process exits (status 3, one line)
    before it takes a message, the launcher restarts it with backoff, and the upload waits in the queue.
    Once the file is there, the restarted worker tags it. Then the same with the registry's active model
    whose file went missing."""
    from catalog.importers import import_fashion_mnist
    from catalog.migrate import upgrade
    from catalog.settings import Settings
    from tests.support.redis_server import RedisServer
    from worker.producers.uploads import enqueue_upload_ids

    url = pg_new_database()
    upgrade(url)
    import_fashion_mnist(url, apply_env["STYLETAG_STORE_URL"], "test", limit=5, progress=False)
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    broker = server.url
    r = redis.Redis.from_url(broker)
    missing = tmp_path / "models" / "current.safetensors"
    env = {**apply_env, "STYLETAG_DATABASE_URL": url, "STYLETAG_BROKER_URL": broker, "STYLETAG_MODEL": str(missing)}
    settings = replace(Settings.from_env(), database_url=url, broker_url=broker)
    ids = [x[0] for x in q(url, "SELECT id FROM products ORDER BY id")]

    def tagged():
        return q(url, "SELECT product_id, status, model_version FROM tag_state ORDER BY 1")

    for step, make_missing, restore, want_version in (
        ("configured checkpoint missing", lambda: None,
         lambda: (missing.parent.mkdir(parents=True, exist_ok=True), shutil.copyfile(DEFAULT_CHECKPOINT, missing)),
         SMALL),
        ("active model's file missing", lambda: _activate_then_remove(env, review_checkpoint, tmp_path),
         lambda: shutil.copyfile(review_checkpoint[0], tmp_path / "active" / "model.safetensors"),
         review_checkpoint[1]),
    ):
        make_missing()
        pid = ids[0] if step.startswith("configured") else ids[1]
        enqueue_upload_ids([pid], settings)
        assert r.llen("uploads") == 1
        w = WorkerProcess(env, tmp_path / f"worker-{len(step)}.log", queues="uploads")
        try:
            wait_until(lambda w=w: w.text().count("worker has no model to serve") >= 1
                       and "restarting it" in w.text(), timeout=120, interval=0.2)
            time.sleep(2.0)  # give a consumer every chance to take the message, if it wrongly would
            assert r.llen("uploads") == 1 and r.hlen("unacked") == 0, step
            assert pid not in {row[0] for row in tagged()}, step
            line = next(ln for ln in w.text().splitlines() if ln.startswith("error: worker has no model to serve"))
            assert str(missing.name if step.startswith("configured") else "model.safetensors") in line, line
            assert " ready." not in w.text()  # it never said it was ready
            assert "exited with status 3; restarting it" in w.text()  # the launcher shows it, and backs off
            exits = w.text().count("exited with status 3")
            restore()
            wait_until(lambda p=pid: p in {row[0] for row in tagged()}, timeout=180, interval=0.3)
            assert (pid, "tagged", want_version) in tagged(), step
            assert r.llen("uploads") == 0
            # every failed start is one error line and one exit (a start that began before the restore may
            # still have failed after it was counted above: count again now)
            exits = w.text().count("exited with status 3")
            assert w.text().count(" ready.") == 1 and w.text().count("error: worker has no model to serve") == exits
            print(f"\n{step}: the worker process exited {exits} time(s) with status 3 before the model was there "
                  f"(queue 1 message, 0 unacked, 0 tag_state rows of the product meanwhile); then 1 ready, the upload "
                  f"tagged with {want_version}")
        finally:
            w.stop()
    server.kill()


def _activate_then_remove(env, review_checkpoint, tmp_path):
    src, version = review_checkpoint
    target = tmp_path / "active" / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    out = js(env, "model", "register", str(target), "--activate")
    assert (out["version"], out["status"]) == (version, "active")
    target.unlink()
