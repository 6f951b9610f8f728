"""A directory inside the store swapped for a symlink to an outside folder, back and forth, while images are
read: no read may ever return the outside bytes.

A thread exchanges ``store/sub`` (a folder holding ``img.png``) and ``store/swap`` (a symlink to
``outside/``, which holds an ``img.png`` of its own) with ``renameat2(RENAME_EXCHANGE)`` in a tight loop,
so that ``store/sub`` is, atomically, one or the other. ``realpath`` followed by an ``open`` of the
resolved path (``O_NOFOLLOW`` guards only the last component) loses this race now and then: the positive
control below shows it does in this very harness. ImageReader opens beneath the store's descriptor with
no symlink allowed on the way (openat2, or one openat per component): every read returns the inside
bytes or raises a typed StorageError.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from catalog.errors import ForbiddenURI, StorageError
from catalog.storage import FileBackend, ImageReader
from catalog.storage import files as file_backend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux only")

INSIDE, OUTSIDE = b"inside bytes", b"OUTSIDE BYTES"
READS = 4000
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        pytest.skip("no renameat2 in this libc")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


class Swapper:
    """Exchanges two names as fast as it can until stopped."""

    def __init__(self, a: str, b: str):
        self.rename = _renameat2()
        self.a, self.b = os.fsencode(a), os.fsencode(b)
        self.swaps = 0
        self.stop = threading.Event()
        if self.rename(AT_FDCWD, self.a, AT_FDCWD, self.b, RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            pytest.skip(f"renameat2(RENAME_EXCHANGE) not supported here: {os.strerror(err)}")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.rename(AT_FDCWD, self.a, AT_FDCWD, self.b, RENAME_EXCHANGE)
            self.swaps += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def race(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    (store / "sub").mkdir(parents=True)
    outside.mkdir()
    (store / "sub" / "img.png").write_bytes(INSIDE)
    (outside / "img.png").write_bytes(OUTSIDE)
    (store / "swap").symlink_to(outside, target_is_directory=True)
    return store


def _race(store, read: Callable[[str], bytes], reads: int = READS, until_escape: bool = False) -> Counter:
    """Outcome counts of ``reads`` reads of store/sub/img.png while the swapper runs."""
    uri = (store / "sub" / "img.png").as_uri()
    outcomes: Counter = Counter()
    with Swapper(str(store / "sub"), str(store / "swap")) as swapper:
        deadline = time.monotonic() + 60
        for _ in range(reads):
            try:
                data = read(uri)
            except StorageError as exc:
                outcomes[f"typed {type(exc).__name__}"] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - counted: the test fails on any
                outcomes[f"untyped {type(exc).__name__}"] += 1
                continue
            outcomes["inside" if data == INSIDE else "ESCAPED" if data == OUTSIDE else "other bytes"] += 1
            if (until_escape and outcomes["ESCAPED"]) or time.monotonic() > deadline:
                break
        outcomes["swaps"] = swapper.swaps
    return outcomes


def _legacy_read(store) -> Callable[[str], bytes]:
    """The file read of catalog/storage.py before the fix: realpath, prefix check, open with O_NOFOLLOW."""
    root = os.path.realpath(store)

    def read(uri: str) -> bytes:
        real = os.path.realpath(uri.removeprefix("file://"))
        if not real.startswith(root + "/"):
            raise StorageError("resolves outside")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise StorageError(exc.strerror) from None
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    return read


def test_positive_control_the_old_open_escapes(race):
    """The harness does open the gap: the old way of opening reads the outside file (and realpath itself
    raises a bare OSError now and then: EINVAL when it meets the name mid-swap)."""
    got = _race(race, _legacy_read(race), reads=40_000, until_escape=True)
    print(f"\nold open under the race: {dict(got)}")
    assert got["ESCAPED"] >= 1, got


@pytest.mark.parametrize("how", ["openat2", "walk"])
def test_no_read_escapes_during_the_swap(race, how):
    if how == "openat2" and not file_backend.HAVE_OPENAT2:
        pytest.skip("openat2 not available in this kernel")
    backend = FileBackend([str(race)], use_openat2=(how == "openat2"))
    reader = ImageReader([race.as_uri() + "/"], 1000, backends={"file": backend})
    got = _race(race, reader.get)
    print(f"\nImageReader ({how}) under the race: {dict(got)}")
    assert got["ESCAPED"] == 0, got
    assert not [k for k in got if k.startswith("untyped") or k == "other bytes"], got
    assert got["inside"] > 0 and got["swaps"] > 0, got  # reads went through, and the swap really ran
    assert sum(v for k, v in got.items() if k.startswith("typed")) > 0, got  # and it did hit them
    assert got["inside"] + sum(v for k, v in got.items() if k.startswith("typed")) == READS


@pytest.mark.parametrize("how", ["openat2", "walk"])
def test_symlinked_component_refused_at_open(tmp_path, monkeypatch, how):
    """Without a race: the open beneath the store refuses a symlink on the way even when the check passed
    (``realpath`` saw a folder a moment ago; now it is a symlink to the outside)."""
    if how == "openat2" and not file_backend.HAVE_OPENAT2:
        pytest.skip("openat2 not available in this kernel")
    store, outside = tmp_path / "store", tmp_path / "outside"
    (store / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "img.png").write_bytes(OUTSIDE)
    (store / "sub").rmdir()
    (store / "sub").symlink_to(outside, target_is_directory=True)
    backend = FileBackend([str(store)], use_openat2=(how == "openat2"))
    reader = ImageReader([store.as_uri() + "/"], 1000, backends={"file": backend})
    real_realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: p if p.startswith(str(store)) else real_realpath(p))
    with pytest.raises(ForbiddenURI, match="became a symlink"):
        reader.get((store / "sub" / "img.png").as_uri())
    with pytest.raises(ForbiddenURI, match="became a symlink"):
        reader.head((store / "sub" / "img.png").as_uri())
    monkeypatch.undo()
    # unpatched: the check refuses it
    with pytest.raises(ForbiddenURI, match="resolves \\(through a symlink\\) outside"):
        reader.get((store / "sub" / "img.png").as_uri())
