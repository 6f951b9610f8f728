"""Issue 6, item 7: broken and hostile images.

Directly (``model.preprocess.decode_image`` with the legacy spec the shipped checkpoint serves with, and
``model.preprocess.decode`` with a photo spec and colours) and end to end through the real pipeline, inline on PostgreSQL
and through a real Celery worker: valid images are tagged (EXIF rotation applied), invalid ones are
recorded as failed with a specific reason, the worker never crashes, and the decompression bombs are
refused on their declared size, before any pixel is allocated.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from model.preprocess import DecodeError, PreprocessSpec, decode
from model.preprocess import decode_image as _decode_image
from tests.security.corpus import BOMB_SIDE, corpus, exif_rotated_jpeg, png_bomb
from tests.support.security import MAX_IMAGE_BYTES, WORKER_PEAK_BOUND_KIB, vm_hwm_kib

MAX_PIXELS = 40_000_000  # the default STYLETAG_MAX_IMAGE_PIXELS
DECODE_CASES = [s for s in corpus(MAX_IMAGE_BYTES) if s.expect != "too_large"]  # the size limit is the reader's
PHOTO_SPEC = PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta")


def decode_image(data: bytes, size: int, channels: int, max_pixels: int):
    """The legacy spec of a checkpoint without 'preprocess' (the shipped one): stretched, as-is."""
    return _decode_image(data, PreprocessSpec.from_checkpoint_meta({"channels": channels, "input_size": size}),
                         max_pixels)


@pytest.mark.parametrize("channels", [1, 3, "photo"])
@pytest.mark.parametrize("sample", DECODE_CASES, ids=lambda s: s.name)
def test_decode_gives_an_array_or_a_specific_reason(sample, channels):
    def run():
        if channels == "photo":  # backdrop fit, foreground crop, lab-delta and colours
            d = decode(sample.data, PHOTO_SPEC, MAX_PIXELS, colours=True)
            assert d.colours is not None and all(0 < share <= 1 for _, share in d.colours)
            return d.array
        return decode_image(sample.data, 28, channels, MAX_PIXELS)

    if sample.expect == "tagged":
        arr = run()
        assert arr.shape == (28, 28, 3 if channels == "photo" else channels) and arr.dtype == np.uint8
    else:
        with pytest.raises(DecodeError) as info:
            run()
        assert info.value.reason == sample.expect, str(info.value)
        assert "\n" not in str(info.value)


def test_exif_orientation_is_applied():
    """Stored 40x20 with a dark top half; orientation 6 shows it rotated 90 degrees clockwise: bright half
    on the left. Without the rotation the dark half would be on top."""
    data = exif_rotated_jpeg()
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    assert stored.shape == (20, 40)
    assert stored[:8].mean() < 40 and stored[12:].mean() > 215  # as stored: dark top, bright bottom
    gray = decode_image(data, 28, 1, MAX_PIXELS)[:, :, 0].astype(np.float32)
    left, right = gray[:, :12].mean(), gray[:, 16:].mean()
    top, bottom = gray[:12].mean(), gray[16:].mean()
    assert left > 215 and right < 40, (left, right)
    assert abs(top - bottom) < 20, (top, bottom)  # no longer split top / bottom
    rgb = decode_image(data, 28, 3, MAX_PIXELS).astype(np.float32)
    assert rgb[:, :12].mean() > 215 and rgb[:, 16:].mean() < 40
    # and it is exactly PIL's own transposition, resized
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    assert np.abs(gray - np.asarray(want, dtype=np.float32)).max() <= 2


def test_pixel_limit_is_our_own_and_declared():
    """7000x7000 = 49e6 pixels: under PIL's own bomb limits, over STYLETAG_MAX_IMAGE_PIXELS (40e6)."""
    with pytest.raises(DecodeError, match="declares 7000x7000 pixels, over the limit of 40000000") as info:
        decode_image(png_bomb(7000), 28, 1, MAX_PIXELS)
    assert info.value.reason == "too_many_pixels"
    arr = decode_image(png_bomb(100), 28, 1, MAX_PIXELS)  # the same construction, small: a valid image
    assert arr.shape == (28, 28, 1)


# VmHWM (this process's peak RSS), not ru_maxrss: Linux carries ru_maxrss over exec from the parent,
# and the parent here is a pytest process with torch loaded.
BOMB_PROBE = """
import json
from tests.support.security import vm_hwm_kib
from tests.security.corpus import corpus, png_bomb
from model.preprocess import DecodeError, PreprocessSpec, decode_image as _decode
def decode_image(data, size, channels, max_pixels):
    return _decode(data, PreprocessSpec.from_checkpoint_meta({"channels": channels, "input_size": size}), max_pixels)
samples = {s.name: s.data for s in corpus(200_000)}
decode_image(samples["one_pixel.png"], 28, 1, 40_000_000)
decode_image(samples["photo.webp"], 28, 3, 40_000_000)
before = vm_hwm_kib("self")
reasons = []
for data in (samples["bomb.png"], samples["bomb.gif"], png_bomb(7000)) * 3:
    try:
        decode_image(data, 28, 1, 40_000_000)
    except DecodeError as exc:
        reasons.append(exc.reason)
after = vm_hwm_kib("self")
print(json.dumps({"before_kib": before, "after_kib": after, "reasons": reasons}))
"""
BOMB_DECODE_BOUND_KIB = 16 * 1024  # growth of the peak RSS allowed for refusing the bombs


def test_bomb_is_refused_before_pixels_are_allocated():
    """In a fresh process: the peak RSS after refusing 9 bombs (2.5e9, 3.6e9 and 4.9e7 declared pixels,
    i.e. 2.5 GB, 3.6 GB and 49 MB as 8-bit pixels) is within 16 MiB of the peak after decoding two small
    images, and under 256 MiB in all."""
    proc = subprocess.run([sys.executable, "-c", BOMB_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"bomb decode probe: peak RSS {probe['before_kib']} KiB before, {probe['after_kib']} KiB after")
    assert probe["reasons"] == ["too_many_pixels"] * 9
    assert probe["after_kib"] - probe["before_kib"] < BOMB_DECODE_BOUND_KIB, probe
    assert probe["after_kib"] < 256 * 1024  # a decoded bomb.png alone would be 2.5 GB
    assert BOMB_SIDE * BOMB_SIDE // 1024 > 10 * probe["after_kib"]


def _expected(hostile_catalog, prefix: str) -> dict[str, tuple]:
    return {sku: row.expect for sku, row in hostile_catalog.rows.items() if sku.startswith(prefix)}


def _got(states: dict, prefix: str) -> dict[str, tuple]:
    return {sku: st[:2] for sku, st in states.items() if sku.startswith(prefix)}


def test_corpus_inline_on_postgres(hostile_catalog):
    want = _expected(hostile_catalog, "img/")
    assert len(want) == len(corpus(MAX_IMAGE_BYTES)) == 20
    assert _got(hostile_catalog.inline_states, "img/") == want
    run = hostile_catalog.inline_run
    assert run["status"] == "done" and run["done"] + run["failed"] == run["total"] == len(hostile_catalog.rows)


def test_corpus_through_celery_worker(hostile_catalog):
    assert _got(hostile_catalog.celery_states, "img/") == _expected(hostile_catalog, "img/")
    assert _got(hostile_catalog.celery_states, "s3/") == _expected(hostile_catalog, "s3/")
    run = hostile_catalog.celery_run
    tagged = sum(1 for r in hostile_catalog.rows.values() if r.expect[0] == "tagged")
    assert (run["status"], run["done"], run["failed"], run["total"]) == (
        "done", tagged, len(hostile_catalog.rows) - tagged, len(hostile_catalog.rows))
    errors = {sku: st[2] for sku, st in hostile_catalog.celery_states.items()}
    assert "CRC" in errors["img/bad_crc.png"]
    assert f"over the limit of {MAX_IMAGE_BYTES}" in errors["img/over_limit.png"]
    assert "2500000000 pixels" in errors["img/bomb.png"]


def _tags(url: str, sku: str) -> list[tuple]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import Product, ProductStyle, StyleLabel

    with session_scope(url) as s:
        rows = s.execute(select(StyleLabel.level, StyleLabel.name, ProductStyle.score, ProductStyle.is_primary)
                         .join(ProductStyle, ProductStyle.label_id == StyleLabel.id)
                         .join(Product, Product.id == ProductStyle.product_id).where(Product.sku == sku)).all()
    return sorted((level, name, round(score, 3), bool(primary)) for level, name, score, primary in rows)


def test_exif_rotation_applied_end_to_end(hostile_catalog, sec):
    """Through the worker, the EXIF-rotated JPEG (file and S3) gets exactly the tags of its displayed
    pixels saved as a plain PNG, and not those of its stored (unrotated) pixels."""
    rotated = _tags(sec.db.admin_url, "img/exif_rotated.jpg")
    assert rotated and _tags(sec.db.admin_url, "s3/exif_rotated.jpg") == rotated
    assert rotated == _tags(sec.db.admin_url, "img/exif_reference_shown.png")
    assert rotated != _tags(sec.db.admin_url, "img/exif_reference_stored.png")


def test_worker_survived_with_bounded_memory(hostile_catalog, sec_worker):
    """The same Celery processes (main and pool child) before and after the corpus, all alive; no process
    of the worker ever held more than 1 GiB, and the corpus raised no peak by more than 256 MiB (decoding
    bomb.png alone would take 2.5 GB)."""
    assert sec_worker.proc.poll() is None
    assert hostile_catalog.worker_pids_before == hostile_catalog.worker_pids_after
    assert len(hostile_catalog.worker_pids_after) == 2  # celery main + one prefork child
    peaks, before = hostile_catalog.worker_peak_kib, hostile_catalog.worker_peak_before_kib
    print("worker peak RSS (VmHWM) KiB before the corpus (model loaded):", before, "after:", peaks)
    assert max(peaks.values()) < WORKER_PEAK_BOUND_KIB, peaks
    # The corpus (its first inference included) raised no process's peak by more than 256 MiB.
    assert all(peaks[pid] - before[pid] < 256 * 1024 for pid in peaks), (before, peaks)
    assert "WorkerLostError" not in sec_worker.text()
    for pid in hostile_catalog.worker_pids_after:  # still running: VmHWM readable
        assert vm_hwm_kib(pid) > 0
