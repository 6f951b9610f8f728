"""Decoding photos in decoder processes (``worker.decode_pool``).

* The pool's output is exactly the threaded decode's (array bytes and colour names), so where a photo is
  decoded never changes its tags; a bad image's reason (``truncated``, ``bad_image``...) crosses the process
  boundary intact.
* A decoder killed mid-run is replaced and the image retried; decoders of a SIGKILLed worker exit by
  themselves.
* Which pipelines use it: photo models by default, 28 px models never unless asked; ``STYLETAG_DECODE_PROCS=0``
  keeps every decode on the fetch threads.
* A photo catalog retagged with decoder processes and without writes the same tags.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog.settings import usable_cores
from model.errors import BadImage
from model.preprocess import PreprocessSpec, decode
from tests.support.photo_model import PHOTO_SPEC
from worker.decode_pool import DecodePool

MAX_PIXELS = 40_000_000
ROOT = Path(__file__).resolve().parents[2]


def _photo(seed: int, fmt: str = "JPEG") -> bytes:
    """A ~700 px product shot: a coloured garment-ish blob on a light, slightly uneven backdrop."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(600, 900)), int(rng.integers(600, 900))
    img = np.full((h, w, 3), 235, np.uint8) + rng.integers(0, 12, (h, w, 1), dtype=np.uint8)
    colour = rng.integers(0, 200, 3, dtype=np.uint8)
    y0, x0 = int(rng.integers(50, h // 3)), int(rng.integers(50, w // 3))
    img[y0:y0 + h // 2, x0:x0 + w // 2] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool():
    p = DecodePool(2)
    yield p
    p.close()


def test_same_arrays_and_colours_as_the_threaded_decode(pool):
    for seed in range(6):
        data = _photo(seed, "JPEG" if seed % 2 else "PNG")
        here = decode(data, PHOTO_SPEC, MAX_PIXELS, colours=True, max_colours=2, min_share=0.25)
        there = pool.decode(data, PHOTO_SPEC, MAX_PIXELS, colours=True, max_colours=2, min_share=0.25)
        assert there.array.dtype == np.uint8 and there.array.shape == here.array.shape
        assert there.array.tobytes() == here.array.tobytes()
        assert there.colours == here.colours and here.colours  # named, and the same names


@pytest.mark.parametrize("data", [b"not an image at all", _photo(1)[:3000], b""])
def test_a_bad_images_reason_crosses_the_process_boundary(pool, data):
    with pytest.raises(BadImage) as here:
        decode(data, PHOTO_SPEC, MAX_PIXELS)
    with pytest.raises(BadImage) as there:
        pool.decode(data, PHOTO_SPEC, MAX_PIXELS)
    assert (there.value.reason, str(there.value)) == (here.value.reason, str(here.value))


def test_too_many_pixels_is_refused_in_the_decoder_too(pool):
    with pytest.raises(BadImage) as there:
        pool.decode(_photo(2), PHOTO_SPEC, 10_000)
    assert there.value.reason == "too_many_pixels"


def test_a_killed_decoder_is_replaced_and_the_image_still_decoded():
    p = DecodePool(1)
    try:
        first = p.decode(_photo(3), PHOTO_SPEC, MAX_PIXELS)
        for proc in list(p._pool._processes.values()):
            os.kill(proc.pid, signal.SIGKILL)
        time.sleep(0.3)
        again = p.decode(_photo(3), PHOTO_SPEC, MAX_PIXELS)
        assert again.array.tobytes() == first.array.tobytes()
        assert p.restarts == 1
    finally:
        p.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_decoders_of_a_sigkilled_worker_exit_by_themselves(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from tests.worker.test_decode_pool import _photo
        from tests.support.photo_model import PHOTO_SPEC
        from worker.decode_pool import DecodePool
        p = DecodePool(2)
        p.decode(_photo(0), PHOTO_SPEC, 40_000_000)
        print(" ".join(str(pid) for pid in p._pool._processes), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert pids and all(_alive(pid) for pid in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "decoder processes outlived their worker"


def test_which_pipelines_decode_in_processes(monkeypatch, tmp_path):
    from catalog.settings import Settings
    from worker.context import WorkerContext

    legacy = PreprocessSpec()
    assert legacy.is_legacy and not PHOTO_SPEC.is_legacy
    monkeypatch.setenv("STYLETAG_HOME", str(tmp_path))
    monkeypatch.delenv("STYLETAG_DECODE_PROCS", raising=False)
    monkeypatch.delenv("STYLETAG_HOST_PROCS", raising=False)
    ctx = WorkerContext(Settings.from_env())
    try:
        assert ctx.decode_pool(legacy) is None  # 28 px: the decode is cheaper than the hand-over
        pool = ctx.decode_pool(PHOTO_SPEC)
        assert pool is not None and pool.procs == usable_cores()  # the cores this process may use
        assert ctx.decode_pool(PHOTO_SPEC) is pool  # one per worker process
    finally:
        ctx.close()
    # the launcher's STYLETAG_HOST_PROCS divides the default between the worker processes of one host
    monkeypatch.setenv("STYLETAG_HOST_PROCS", "2")
    ctx = WorkerContext(Settings.from_env())
    try:
        assert ctx.decode_pool(PHOTO_SPEC).procs == max(1, usable_cores() // 2)
    finally:
        ctx.close()
    monkeypatch.setenv("STYLETAG_HOST_PROCS", "64")
    ctx = WorkerContext(Settings.from_env())
    try:
        assert ctx.decode_pool(PHOTO_SPEC).procs == 1  # never none for a photo model
    finally:
        ctx.close()
    monkeypatch.delenv("STYLETAG_HOST_PROCS")
    for value, photo, grey in (("0", None, None), ("3", 3, 3)):
        monkeypatch.setenv("STYLETAG_DECODE_PROCS", value)
        ctx = WorkerContext(Settings.from_env())
        try:
            got = ctx.decode_pool(PHOTO_SPEC)
            assert (got.procs if got else None) == photo
            ctx.close()
            got = ctx.decode_pool(legacy)
            assert (got.procs if got else None) == grey
        finally:
            ctx.close()


def test_a_photo_retag_writes_the_same_tags_with_and_without_decoder_processes(sqlite_url, tmp_path, monkeypatch,
                                                                              capsys):
    """Through the CLI's inline retag, on a photo catalog with a bad image among the photos."""
    import json

    from sqlalchemy import create_engine, text

    from tests.support.cli import run_styletag
    from worker.context import reset_context

    store = tmp_path / "store"
    store.mkdir()
    rows = ["sku,image_uri,title"]
    for i in range(40):
        data = b"garbage" if i == 7 else _photo(100 + i)
        (store / f"p{i}.jpg").write_bytes(data)
        rows.append(f"p{i},{(store / f'p{i}.jpg').as_uri()},photo {i}")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    model = tmp_path / "photo.safetensors"
    from tests.support.photo_model import photo_checkpoint

    photo_checkpoint(model, seed=3, colour={"max_colours": 2, "min_share": 0.25})
    for k, v in {"STYLETAG_DATABASE_URL": sqlite_url, "STYLETAG_HOME": str(tmp_path / "home"),
                 "STYLETAG_STORE_URL": store.as_uri(), "STYLETAG_ALLOWED_IMAGE_PREFIXES": store.as_uri() + "/",
                 "STYLETAG_DEVICE": "cpu", "STYLETAG_MODEL": str(model)}.items():
        monkeypatch.setenv(k, v)

    def styletag(*args):
        proc = run_styletag(capsys, *args)
        assert proc.returncode == 0, (args, proc.stdout[-1500:], proc.stderr[-1500:])
        return proc.stdout

    styletag("import", "catalog", str(tmp_path / "c.csv"))
    engine = create_engine(sqlite_url)

    def tags():
        with engine.connect() as c:
            styles = c.execute(text("SELECT p.sku, l.level, l.name, round(s.score, 5), s.is_primary FROM product_styles s "
                                    "JOIN products p ON p.id = s.product_id JOIN style_labels l ON l.id = s.label_id "
                                    "ORDER BY 1, 2, 3")).all()
            states = c.execute(text("SELECT p.sku, t.status, t.reason FROM tag_state t JOIN products p "
                                    "ON p.id = t.product_id ORDER BY 1")).all()
        return styles, states

    got = {}
    for procs in ("2", "0"):
        monkeypatch.setenv("STYLETAG_DECODE_PROCS", procs)
        reset_context()
        run = json.loads(styletag("retag", "--all", "--inline", "--json").strip().splitlines()[-1])
        assert (run["done"], run["failed"]) == (39, 1), run
        got[procs] = tags()
    reset_context()
    engine.dispose()
    styles, states = got["2"]
    assert {lvl for _, lvl, *_ in styles} == {"coarse", "fine", "colour"}
    assert [tuple(s) for s in states if s[0] == "p7"] == [("p7", "failed", "not_an_image")]
    assert got["2"] == got["0"]


def test_decode_many_gives_each_image_its_own_outcome(pool):
    blobs = [_photo(10), b"junk", _photo(11), _photo(12)[:2000]]
    got = pool.decode_many(blobs, PHOTO_SPEC, MAX_PIXELS, colours=True)
    assert len(got) == 4
    for data, out in zip(blobs, got, strict=True):
        try:
            want = decode(data, PHOTO_SPEC, MAX_PIXELS, colours=True)
        except BadImage as exc:
            assert isinstance(out, BadImage) and (out.reason, str(out)) == (exc.reason, str(exc))
        else:
            assert out.array.tobytes() == want.array.tobytes() and out.colours == want.colours
    assert [type(o).__name__ for o in got] == ["Decoded", "BadImage", "Decoded", "BadImage"]
