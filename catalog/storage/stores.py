"""Our own bucket or folder: where importers put images, and from which their URIs are derived."""

from __future__ import annotations

import posixpath
from dataclasses import replace
from pathlib import Path

from catalog.errors import ConfigError, ForbiddenURI, ObjectMissing
from catalog.settings import Settings
from catalog.storage.files import FileBackend
from catalog.storage.registry import Fetched, ObjectInfo, WritableBackend, backend_class
from catalog.storage.s3 import S3Backend
from catalog.storage.uri import Location, check_key, check_uri, parse_uri


class Store:
    """A writable backend confined to one prefix (``url``); keys are relative to it."""

    url: str
    backend: WritableBackend

    def uri_for(self, key: str) -> str:
        raise NotImplementedError

    def location(self, uri_or_key: str) -> Location:
        """A key of this store, or a URI inside it (anything else is a ForbiddenURI)."""
        if "://" in uri_or_key:
            return check_uri(uri_or_key, (self.url,))
        return parse_uri(self.uri_for(check_key(uri_or_key)))

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Write ``data``; the version returned is the one ``head`` and a read will report."""
        return self.backend.put(self.location(check_key(key)), data, content_type)

    def put_if_changed(self, key: str, data: bytes,
                       content_type: str | None = None) -> tuple[ObjectInfo, bool]:
        """Write unless the store already holds exactly these bytes: (info, written). Importers use it,
        so that a re-import keeps every version (and nothing is retagged)."""
        loc = self.location(check_key(key))
        info = self.backend.matches(loc, data)
        if info is not None:
            return info, False
        return self.backend.put(loc, data, content_type), True

    def fetch(self, uri_or_key: str) -> Fetched:
        return self.backend.read(self.location(uri_or_key), None)

    def get(self, uri_or_key: str) -> bytes:
        return self.fetch(uri_or_key).data

    def head(self, uri_or_key: str) -> ObjectInfo:
        return self.backend.head(self.location(uri_or_key))

    def exists(self, uri_or_key: str) -> bool:
        try:
            self.head(uri_or_key)
        except ObjectMissing:
            return False
        return True


class FileStore(Store):
    def __init__(self, root: str, settings: Settings | None = None):
        self.root = posixpath.normpath(root)
        self.url = Path(self.root).as_uri()
        self.backend = FileBackend([self.root])

    def uri_for(self, key: str) -> str:
        return Path(self.root, check_key(key)).as_uri()


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", settings: Settings | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.backend = S3Backend(settings)

    def uri_for(self, key: str) -> str:
        check_key(key)
        return f"s3://{self.bucket}/{self.prefix}/{key}" if self.prefix else f"s3://{self.bucket}/{key}"


# The backends that can hold our own store, and how a store is made from its parsed URL.
STORES = {
    FileBackend: lambda loc, settings: FileStore(loc.path, settings),
    S3Backend: lambda loc, settings: S3Store(loc.bucket, loc.key, settings),
}


def open_store(url: str, settings: Settings | None = None) -> Store:
    """The store for ``s3://bucket[/prefix]`` or ``file:///abs/path``; anything else is a ConfigError."""
    try:
        loc = parse_uri(url)
    except ForbiddenURI as exc:
        raise ConfigError(f"bad store URL {url[:200]!r}: {exc}") from None
    make = STORES.get(backend_class(loc.scheme))
    if make is None:
        kinds = " or ".join(sorted(f"{s}://" for cls in STORES for s in cls.schemes))
        raise ConfigError(f"bad store URL {url[:200]!r}: a store must be {kinds} "
                          f"({loc.scheme}:// is read-only)")
    return make(loc, settings)


def _any_backend(loc: Location):
    settings = replace(Settings(), allowed_image_prefixes=(loc.uri,))
    return backend_class(loc.scheme).from_settings(settings)


def head_location(loc: Location) -> ObjectInfo:
    """``head`` of one parsed location, confined to exactly that location (kept for older callers)."""
    return _any_backend(loc).head(loc)


def read_location(loc: Location, max_bytes: int | None) -> bytes:
    """The bytes of one parsed location, confined to exactly that location (kept for older callers)."""
    return _any_backend(loc).read(loc, max_bytes).data
