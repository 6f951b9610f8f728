"""The reader of catalog image URIs: the security boundary between catalog rows and storage.

Every URI is checked against the allowed prefixes before any backend sees it; objects over the byte
limit are refused without their bytes being fetched (or, where the size is not known up front, cut off
at the limit); and whatever goes wrong reading one URI is a typed :class:`StorageError` for that URI,
never a bare exception that would fail a whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from catalog.errors import ConfigError, ForbiddenURI, StorageError, TransientStorageError
from catalog.settings import Settings
from catalog.storage.files import file_error
from catalog.storage.registry import Backend, Fetched, ObjectInfo, open_backends, too_large
from catalog.storage.uri import Location, check_uri, parse_prefixes

T = TypeVar("T")


class ImageReader:
    """Reads catalog image URIs within ``allowed_prefixes``, refusing objects over ``max_bytes``.

    ``settings`` supplies the rest (S3 retries and pool, HTTP timeouts, fetch threads); by default the
    defaults of :class:`Settings`. Workers build it with :meth:`from_settings`."""

    def __init__(self, allowed_prefixes: Sequence[str], max_bytes: int | None = None, *,
                 settings: Settings | None = None, backends: dict[str, Backend] | None = None):
        if not allowed_prefixes:
            raise ConfigError("no allowed image prefixes; set STYLETAG_ALLOWED_IMAGE_PREFIXES")
        settings = settings or Settings()
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_bytes = int(settings.max_image_bytes if max_bytes is None else max_bytes)
        self.settings = replace(settings, allowed_image_prefixes=self.allowed_prefixes,
                                max_image_bytes=self.max_bytes)
        self._prefixes = parse_prefixes(self.allowed_prefixes)
        self.backends = open_backends(self.settings, {p.scheme for p in self._prefixes})
        self.backends.update(backends or {})

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageReader:
        return cls(settings.allowed_image_prefixes, settings.max_image_bytes, settings=settings)

    def _locate(self, uri: str) -> tuple[Location, Backend]:
        loc = check_uri(uri, self._prefixes)
        backend = self.backends.get(loc.scheme)
        if backend is None:  # a prefix of a scheme nobody serves; check_uri would have refused it
            raise ForbiddenURI(f"no storage backend for {loc.scheme}:// ({uri[:200]!r})")
        return loc, backend

    def fetch(self, uri: str) -> Fetched:
        """The bytes behind ``uri`` and the version of exactly those bytes: what the worker records, so
        that a later :meth:`head` tells whether the photo changed since it was tagged."""
        return _guarded(uri, lambda: self._fetch(uri))

    def _fetch(self, uri: str) -> Fetched:
        loc, backend = self._locate(uri)
        fetched = backend.read(loc, self.max_bytes)
        if len(fetched.data) > self.max_bytes:  # every backend stops at the limit; this one did not
            raise too_large(loc.uri, len(fetched.data), self.max_bytes)
        return fetched

    def get(self, uri: str) -> bytes:
        return self.fetch(uri).data

    def head(self, uri: str) -> ObjectInfo:
        """Size and version without the bytes (where the backend can tell): for a refresh pass that
        updates ``products.image_version`` when a photo was replaced."""

        def run() -> ObjectInfo:
            loc, backend = self._locate(uri)
            return backend.head(loc)

        return _guarded(uri, run)

    def fetch_many(self, uris: Sequence[str], max_workers: int | None = None) -> list[Fetched | StorageError]:
        """Fetch concurrently; results in input order, each a :class:`Fetched` or the error for that item."""
        return self._many(self.fetch, uris, max_workers)

    def get_many(self, uris: Sequence[str], max_workers: int | None = None) -> list[bytes | StorageError]:
        return [r.data if isinstance(r, Fetched) else r for r in self.fetch_many(uris, max_workers)]

    def head_many(self, uris: Sequence[str],
                  max_workers: int | None = None) -> list[ObjectInfo | StorageError]:
        return self._many(self.head, uris, max_workers)

    def _many(self, one: Callable[[str], T], uris: Sequence[str],
              max_workers: int | None) -> list[T | StorageError]:
        if not uris:
            return []

        def safe(uri: str) -> T | StorageError:
            try:
                return one(uri)
            except StorageError as exc:
                return exc
            except Exception as exc:  # noqa: BLE001 - one bad item must not fail the whole batch
                return TransientStorageError(f"reading {str(uri)[:200]} failed: {exc.__class__.__name__}")

        workers = max(1, min(max_workers or self.settings.fetch_threads, len(uris)))
        if workers == 1:
            return [safe(u) for u in uris]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="styletag-fetch") as pool:
            return list(pool.map(safe, uris))


def _guarded(uri: str, call: Callable[[], T]) -> T:
    """Typed errors pass; an OSError or ValueError nobody expected (``realpath`` raising EINVAL, a path
    the file system cannot encode) becomes the StorageError of this one URI."""
    try:
        return call()
    except StorageError:
        raise
    except UnicodeError:
        raise ForbiddenURI(f"image URI {str(uri)[:200]!r} cannot be encoded as a path") from None
    except OSError as exc:
        raise file_error(exc, str(uri)) from None
    except ValueError as exc:
        raise StorageError(f"cannot read {str(uri)[:200]}: {exc.__class__.__name__}") from None
