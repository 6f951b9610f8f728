"""Image versions notice a new photo: on every backend the version changes whenever the bytes behind a URI
change, and ``head`` reports the same version as a ``fetch`` of the same bytes (file folder and a real S3
HTTP endpoint served by moto; https has its own tests in test_https_source.py)."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from catalog.errors import ObjectMissing
from catalog.storage import Fetched, FileBackend, ImageReader, ObjectInfo, open_store
from catalog.storage import files as file_backend

MAX = 10_000


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store((tmp_path / "store" / "img").as_uri())
    s3 = request.getfixturevalue("s3_server")
    return open_store(f"s3://{s3.make_bucket()}/img")


@pytest.fixture
def reader(store):
    return ImageReader([store.url + "/"], max_bytes=MAX)


def _replace_behind_the_store(store, key: str, data: bytes) -> None:
    """Another program replaces the object: a plain rewrite of the file, a plain put_object on S3."""
    if store.url.startswith("file://"):
        with open(store.uri_for(key).removeprefix("file://"), "wb") as fh:
            fh.write(data)
    else:
        store.backend.client().put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=data)


def test_unchanged_object_same_version_from_put_head_and_fetch(store, reader):
    info = store.put("a.png", b"photo one")
    uri = store.uri_for("a.png")
    fetched = reader.fetch(uri)
    assert fetched == Fetched(b"photo one", info.version)
    assert reader.head(uri) == info == store.head("a.png") == ObjectInfo(9, info.version)
    assert store.fetch("a.png") == fetched
    time.sleep(0.02)
    assert reader.fetch(uri).version == reader.head(uri).version == info.version  # nothing changed: same


def test_version_changes_when_the_photo_is_replaced(store, reader):
    uri = store.uri_for("a.png")
    first = store.put("a.png", b"photo one")
    second = store.put("a.png", b"photo two")  # same size, same key, straight after: still a new version
    assert second.version != first.version
    assert reader.head(uri).version == reader.fetch(uri).version == second.version
    time.sleep(0.02)  # past any coarse file-system clock tick
    _replace_behind_the_store(store, "a.png", b"photo three, bigger")
    third = reader.head(uri)
    assert third.version not in (first.version, second.version)
    assert reader.fetch(uri) == Fetched(b"photo three, bigger", third.version)
    time.sleep(0.02)
    _replace_behind_the_store(store, "a.png", b"photo four, bigger!")  # the same size again
    assert reader.head(uri).version != third.version
    assert reader.fetch(uri).version == reader.head(uri).version


def test_versions_are_each_backends_own(store):
    data = b"\x89PNG some bytes"
    info = store.put("v.png", data)
    if store.url.startswith("s3://"):
        assert info.version == hashlib.md5(data).hexdigest()  # the ETag of a simple put
    else:
        st = os.stat(store.uri_for("v.png").removeprefix("file://"))
        assert info.version == f"{st.st_size}-{st.st_mtime_ns}"


def test_put_if_changed_keeps_the_version_of_the_same_bytes(store):
    info, written = store.put_if_changed("k.png", b"same bytes")
    assert written
    time.sleep(0.02)
    again, written = store.put_if_changed("k.png", b"same bytes")
    assert (again, written) == (info, False)
    changed, written = store.put_if_changed("k.png", b"other byte")
    assert written and changed.version != info.version
    assert store.head("k.png") == changed


def test_same_size_and_mtime_still_gets_a_new_version(tmp_path, monkeypatch):
    """A put that lands on the old file's size and timestamp (a coarse clock, a copied mtime) moves the
    mtime on, so that the version differs."""
    store = open_store(tmp_path.as_uri())
    first = store.put("a.png", b"12345")
    path = tmp_path / "a.png"
    mtime = path.stat().st_mtime_ns
    real_fstat, faked = os.fstat, []

    def same_clock(fd):  # the new temp file is written within the old file's clock tick
        st = real_fstat(fd)
        if not faked and st.st_size == 5 and st.st_ino != path.stat().st_ino:
            faked.append(fd)
            os.utime(fd, ns=(st.st_atime_ns, mtime))
            st = real_fstat(fd)
        return st

    monkeypatch.setattr(os, "fstat", same_clock)
    second = store.put("a.png", b"54321")
    monkeypatch.undo()
    assert faked and second.version != first.version
    assert store.head("a.png") == second and store.get("a.png") == b"54321"


def test_a_file_changing_during_the_read_is_read_again(tmp_path, monkeypatch):
    """The version returned is the version of the bytes returned, even if a writer changed the file
    between the fstat and the read."""
    path = tmp_path / "a.png"
    path.write_bytes(b"old photo")
    reader = ImageReader([tmp_path.as_uri() + "/"], max_bytes=MAX)
    real_read_all, calls = file_backend._read_all, []

    def read_while_rewritten(fd, limit):
        calls.append(limit)
        if len(calls) == 1:
            with open(path, "r+b") as fh:  # in place: same inode, new size
                fh.write(b"the new photo")
        return real_read_all(fd, limit)

    monkeypatch.setattr(file_backend, "_read_all", read_while_rewritten)
    fetched = reader.fetch(path.as_uri())
    assert len(calls) == 2
    st = path.stat()
    assert fetched == Fetched(b"the new photo", f"{st.st_size}-{st.st_mtime_ns}")
    assert reader.head(path.as_uri()).version == fetched.version


def test_many_return_versions_in_order(store, reader):
    uris = [store.uri_for(f"m{i}.png") for i in range(6)]
    infos = [store.put(f"m{i}.png", bytes([i]) * (i + 1)) for i in range(6)]
    missing = store.uri_for("nope.png")
    fetched = reader.fetch_many(uris + [missing], max_workers=4)
    heads = reader.head_many(uris + [missing], max_workers=4)
    assert [f.version for f in fetched[:6]] == [h.version for h in heads[:6]] == [i.version for i in infos]
    assert [f.data for f in fetched[:6]] == [bytes([i]) * (i + 1) for i in range(6)]
    assert isinstance(fetched[6], ObjectMissing) and isinstance(heads[6], ObjectMissing)


def test_file_backend_without_openat2_reports_the_same_versions(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"x" * 10)
    uri = (tmp_path / "d" / "x.png").as_uri()
    backend = FileBackend([str(tmp_path)], use_openat2=False)
    walk = ImageReader([tmp_path.as_uri() + "/"], MAX, backends={"file": backend})
    assert walk.backends["file"].use_openat2 is False
    assert walk.fetch(uri) == ImageReader([tmp_path.as_uri() + "/"], MAX).fetch(uri)


def test_empty_object_same_version_from_head_and_fetch(store, reader):
    """On S3 the ranged GET of an empty object is answered 416; its version is still the object's ETag."""
    info = store.put("empty.png", b"")
    uri = store.uri_for("empty.png")
    assert reader.fetch(uri) == Fetched(b"", info.version)
    assert reader.head(uri) == ObjectInfo(0, info.version)
