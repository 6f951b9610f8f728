"""Object storage on both backends (a file folder and a real S3 HTTP endpoint served by moto):
every limit gives its typed error, and nothing outside the allowed prefixes is ever read."""

from __future__ import annotations

import errno
import os

import pytest

from catalog.errors import (
    ConfigError,
    ForbiddenURI,
    ObjectMissing,
    ObjectTooLarge,
    StorageError,
    TransientStorageError,
)
from catalog.storage import ImageReader, ObjectInfo, check_uri, open_store

MAX = 1000


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """An empty store of each kind, under a prefix, as a URL."""
    if request.param == "file":
        return open_store((tmp_path / "store" / "img").as_uri())
    s3 = request.getfixturevalue("s3_server")
    return open_store(f"s3://{s3.make_bucket()}/img")


@pytest.fixture
def reader(store):
    return ImageReader([store.url + "/"], max_bytes=MAX)


def test_put_get_head_exists(store):
    info = store.put("a/b.png", b"hello", content_type="image/png")
    if store.url.startswith("s3://"):
        assert info == ObjectInfo(size=5, version="5d41402abc4b2a76b9719d911017c592")  # the ETag: an md5
    else:  # size and mtime (ns) of the file, as head and a read report them
        st = os.stat(store.uri_for("a/b.png").removeprefix("file://"))
        assert info == ObjectInfo(size=5, version=f"5-{st.st_mtime_ns}")
    assert store.uri_for("a/b.png") == store.url + "/a/b.png"
    assert store.get("a/b.png") == b"hello"
    assert store.get(store.uri_for("a/b.png")) == b"hello"
    assert store.head("a/b.png") == info
    assert store.exists("a/b.png") and not store.exists("a/nope.png")
    store.put("a/b.png", b"hello, again")
    assert store.head("a/b.png").version != info.version


def test_reader_get_and_get_many_in_order(store, reader):
    uris = [store.uri_for(f"k{i}.bin") for i in range(20)]
    for i in range(len(uris)):
        store.put(f"k{i}.bin", bytes([i]) * (i + 1))
    store.put("big.bin", b"x" * (MAX + 1))
    assert reader.get(uris[3]) == b"\x03" * 4
    assert reader.head(uris[3]).size == 4
    mixed = uris + [store.uri_for("missing.bin"), store.uri_for("big.bin"), "http://example.com/x.png"]
    results = reader.get_many(mixed, max_workers=8)
    assert results[:20] == [bytes([i]) * (i + 1) for i in range(20)]
    assert [type(r) for r in results[20:]] == [ObjectMissing, ObjectTooLarge, ForbiddenURI]
    assert reader.get_many([]) == []


def test_oversized_object_is_refused(store, reader):
    store.put("exact.bin", b"x" * MAX)
    store.put("big.bin", b"x" * (MAX + 1))
    assert len(reader.get(store.uri_for("exact.bin"))) == MAX
    with pytest.raises(ObjectTooLarge, match="over the limit"):
        reader.get(store.uri_for("big.bin"))


def test_missing_key_is_typed(store, reader):
    with pytest.raises(ObjectMissing):
        reader.get(store.uri_for("nope.png"))
    with pytest.raises(ObjectMissing):
        reader.head(store.uri_for("nope.png"))
    with pytest.raises(ObjectMissing):
        store.get("nope.png")


def test_forbidden_prefix_dotdot_and_scheme(store, reader):
    base = store.url
    store.put("ok.bin", b"ok")
    bad = [
        base + "X/ok.bin",  # sibling prefix imgX/ is not img/
        base.rsplit("/", 1)[0] + "/other/ok.bin",  # another folder of the same bucket / parent
        base + "/../img/ok.bin",
        base + "/a/%2e%2e/ok.bin",
        base + "/a/%252e%252E/ok.bin",
        "http://example.com/img/ok.bin",
        "ftp://host/img/ok.bin",
        "/etc/passwd",
        base + "/" + "a" * 2100,
    ]
    if base.startswith("s3://"):
        bucket = base.split("/")[2]
        bad.append(f"s3://{bucket}2/img/ok.bin")  # another bucket with a common prefix
    for uri in bad:
        with pytest.raises(ForbiddenURI):
            reader.get(uri)
    assert reader.get(base + "/ok.bin") == b"ok"


def test_errors_never_leak_credentials(s3_server):
    reader = ImageReader(["s3://nobucket-here/"], max_bytes=MAX)
    with pytest.raises(StorageError) as exc:
        reader.get("s3://nobucket-here/x.png")
    assert "testing" not in str(exc.value) and "\n" not in str(exc.value)


def test_check_uri_boundaries():
    allowed = ["s3://bucket/img/", "file:///srv/images"]
    assert check_uri("s3://bucket/img/a/b.png", allowed).key == "img/a/b.png"
    assert check_uri("file:///srv/images/x.png", allowed).path == "/srv/images/x.png"
    assert check_uri("file://localhost/srv/images/a%20b.png", allowed).path == "/srv/images/a b.png"
    for uri in ["s3://bucket/imgX/a.png", "s3://bucket2/img/a.png", "s3://bucket/img/../secret",
                "file:///srv/imagesX/a.png", "file:///srv/images/../x", "file://evil/srv/images/a.png",
                "S3://bucket/img/%2E%2E/x", "s3://bucket/img/a.png?x=1", "file:///srv/images/a\x00.png", ""]:
        with pytest.raises(ForbiddenURI):
            check_uri(uri, allowed)


def test_open_store_rejects_unknown_urls(tmp_path):
    for url in ["http://x/y", "relative/path", "gs://bucket/x"]:
        with pytest.raises(ConfigError):
            open_store(url)
    with pytest.raises(ForbiddenURI):
        open_store(tmp_path.as_uri()).put("../escape.bin", b"x")


def test_symlink_out_of_prefix_is_refused(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    os.symlink(secret, allowed / "link.png")
    (allowed / "inside.png").write_bytes(b"img")
    os.symlink(allowed / "inside.png", allowed / "inside-link.png")
    reader = ImageReader([allowed.as_uri() + "/"], max_bytes=MAX)
    with pytest.raises(ForbiddenURI, match="symlink"):
        reader.get((allowed / "link.png").as_uri())
    assert reader.get((allowed / "inside-link.png").as_uri()) == b"img"


def test_one_s3_client_shared_across_threads(s3_server):
    from concurrent.futures import ThreadPoolExecutor

    from catalog.storage import s3_client

    with ThreadPoolExecutor(8) as pool:
        clients = set(map(id, pool.map(lambda _: s3_client(), range(32))))
    assert len(clients) == 1
    config = s3_client().meta.config
    assert config.retries["mode"] == "standard" and config.max_pool_connections >= 16


def test_s3_image_read_is_one_ranged_get(s3_server):
    """The reader's size check rides on the GET's Content-Range: one request per image, no HEAD; an
    object over the limit is refused without its body being read; an empty object reads as empty."""
    from catalog.storage import s3_client

    store = open_store(f"s3://{s3_server.make_bucket()}/img")
    reader = ImageReader([store.url + "/"], max_bytes=MAX)
    store.put("ok.bin", b"y" * 700)
    store.put("big.bin", b"x" * (50 * MAX))
    store.put("empty.bin", b"")
    calls: list[str] = []

    def count(event_name, **_):
        calls.append(event_name.rsplit(".", 1)[-1])

    events = s3_client().meta.events
    events.register("before-call.s3", count)
    try:
        assert reader.get(store.uri_for("ok.bin")) == b"y" * 700
        assert calls == ["GetObject"]
        with pytest.raises(ObjectTooLarge, match=f"{50 * MAX} bytes, over the limit"):
            reader.get(store.uri_for("big.bin"))
        assert reader.get(store.uri_for("empty.bin")) == b""
        assert calls == ["GetObject"] * 3
    finally:
        events.unregister("before-call.s3", count)


# --- no bare exception escapes a read ------------------------------------------------------------------


def _file_reader(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"ok")
    return ImageReader([tmp_path.as_uri() + "/"], max_bytes=MAX), (tmp_path / "ok.png").as_uri()


@pytest.mark.parametrize("exc", [OSError(errno.EINVAL, "Invalid argument"), OSError(errno.EIO, "I/O error"),
                                 ValueError("odd"), UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogate")])
def test_unexpected_errors_in_a_read_become_typed(tmp_path, monkeypatch, exc):
    """``realpath`` or the open raising EINVAL (realpath does when a name is swapped for a symlink under it),
    an I/O error, a ValueError from deep inside: each is the StorageError of that one URI, never a bare
    exception."""
    import catalog.storage.files as files

    reader, uri = _file_reader(tmp_path)

    def boom(path):
        raise exc

    monkeypatch.setattr(files.os.path, "realpath", boom)
    # and the open beneath the root (the route a path without symlinks takes, realpath not called)
    monkeypatch.setattr(files, "openat2_beneath", lambda *a: boom(a))
    monkeypatch.setattr(files, "walk_beneath", lambda *a: boom(a))
    for call in (reader.get, reader.head, reader.fetch):
        with pytest.raises(StorageError) as info:
            call(uri)
        assert "\n" not in str(info.value) and uri[:50] in str(info.value)
    if getattr(exc, "errno", None) == errno.EIO:
        assert isinstance(info.value, TransientStorageError)
    results = reader.get_many([uri, uri], max_workers=2)
    assert all(isinstance(r, StorageError) for r in results)
    monkeypatch.undo()
    assert reader.get_many([uri, uri]) == [b"ok", b"ok"]


def test_odd_bytes_in_a_path_are_typed(tmp_path):
    reader, uri = _file_reader(tmp_path)
    base = tmp_path.as_uri()
    for odd in (base + "/\udcff.png", base + "/\ud800.png", base + "/%ff%fe.png", base + "/a%00b.png",
                base + "/" + "n" * 300 + ".png", base + "/ok.png/x.png"):
        with pytest.raises(StorageError):
            reader.get(odd)
        assert isinstance(reader.get_many([odd, uri])[0], StorageError)
    assert reader.get_many([base + "/\udcff.png", uri])[1] == b"ok"


def test_read_errors_from_the_descriptor_are_typed(tmp_path, monkeypatch):
    import catalog.storage.files as files

    reader, uri = _file_reader(tmp_path)

    def failing_read(fd, limit):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "_read_all", failing_read)
    with pytest.raises(TransientStorageError, match="Input/output error"):
        reader.get(uri)
    monkeypatch.setattr(files, "_read_all", lambda fd, limit: (_ for _ in ()).throw(ValueError("odd")))
    with pytest.raises(StorageError, match="ValueError"):
        reader.get(uri)
