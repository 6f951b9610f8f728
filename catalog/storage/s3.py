"""``s3://bucket/key`` objects through boto3: one shared client per process and configuration.

Endpoint and credentials come only from boto3's own environment (``AWS_ENDPOINT_URL``, ...); this module
never reads a secret, and error messages name the URI and the error code, nothing else. The version of an
object is its ETag (unquoted), as the GET or HEAD response gives it.
"""

from __future__ import annotations

import hashlib
import os
import threading

from catalog.errors import ObjectMissing, StorageError, TransientStorageError
from catalog.settings import Settings, aws_endpoint
from catalog.storage import uri as uris
from catalog.storage.registry import Fetched, ObjectInfo, too_large
from catalog.storage.uri import Location

_EMPTY_ETAG = hashlib.md5(b"", usedforsecurity=False).hexdigest()  # what S3 reports for an empty put
_DEFAULTS = Settings()

_client_lock = threading.Lock()
_client_cache: dict[tuple, object] = {}


def _client_options(settings: Settings) -> tuple:
    # One pooled connection per fetch thread, plus headroom for puts and a second reader in the process.
    pool = max(2 * settings.fetch_threads, 32)
    return settings.s3_max_attempts, pool, settings.http_connect_timeout, settings.http_read_timeout


def s3_client(settings: Settings | None = None):
    """The process's S3 client for these settings (thread-safe to share; boto3 *sessions* are not, so
    create it once under a lock). Re-created after fork, so that a child never shares the parent's
    sockets, and when boto3's endpoint variables change."""
    options = _client_options(settings or _DEFAULTS)
    where = (os.getpid(), aws_endpoint())
    key = (*where, options)
    client = _client_cache.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            attempts, pool, connect, read = options
            config = Config(retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=pool,
                            connect_timeout=connect, read_timeout=read)
            client = boto3.session.Session().client("s3", config=config)
            for stale in [k for k in _client_cache if k[:2] != where]:
                del _client_cache[stale]
            _client_cache[key] = client
    return client


def reset_s3_client() -> None:
    """Forget the cached clients (tests that change the endpoint; after credentials rotate)."""
    with _client_lock:
        _client_cache.clear()


_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def s3_error(exc: Exception, uri: str) -> StorageError:
    """Map a botocore exception to our typed errors; messages carry the code, never credentials."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _MISSING_CODES or status == 404:
            return ObjectMissing(f"no object at {uri} ({code or status})")
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStorageError(f"S3 error {code or status} for {uri}; retry later")
        if code in ("InvalidRange", "416") or status == 416:
            return StorageError(f"S3 refused the byte range for {uri} ({code})")
        return StorageError(f"S3 error {code or status} for {uri}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no S3 credentials for {uri}; "
                            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(exc, BotoCoreError):
        return TransientStorageError(f"S3 unreachable for {uri}: {exc.__class__.__name__}; retry later")
    return TransientStorageError(f"S3 read failed for {uri}: {exc.__class__.__name__}")


def _etag(headers: dict) -> str:
    return str(headers.get("ETag") or headers.get("etag") or "").strip('"')


class S3Backend:
    schemes = ("s3",)
    syntax = staticmethod(uris.bucket_key)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or _DEFAULTS

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Backend:
        return cls(settings)

    def client(self):
        return s3_client(self.settings)

    def head(self, loc: Location) -> ObjectInfo:
        try:
            resp = self.client().head_object(Bucket=loc.bucket, Key=loc.key)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise s3_error(exc, loc.uri) from None
        return ObjectInfo(size=int(resp["ContentLength"]), version=_etag(resp))

    def read(self, loc: Location, max_bytes: int | None) -> Fetched:
        """One GET. With a limit it asks for ``bytes=0-max_bytes``, which caps the transfer at
        ``max_bytes + 1`` and whose ``Content-Range: bytes 0-N/TOTAL`` gives the object's size, so the size
        check needs no HEAD; the body of an object over the limit is not read. A range on an empty object
        is unsatisfiable (416): that is an empty object."""
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": loc.bucket, "Key": loc.key}
        if max_bytes is not None:
            kwargs["Range"] = f"bytes=0-{max_bytes}"
        try:
            resp = self.client().get_object(**kwargs)
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
            if max_bytes is not None and (exc.response.get("Error", {}).get("Code") == "InvalidRange"
                                          or meta.get("HTTPStatusCode") == 416):
                return Fetched(b"", _etag(meta.get("HTTPHeaders") or {}) or _EMPTY_ETAG)
            raise s3_error(exc, loc.uri) from None
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise s3_error(exc, loc.uri) from None
        body = resp["Body"]
        try:
            if max_bytes is None:
                return Fetched(body.read(), _etag(resp))
            # "bytes 0-N/TOTAL"; a store that ignores Range sends the whole object: then ContentLength
            size = str(resp.get("ContentRange") or "").rpartition("/")[2]
            total = int(size) if size.isdigit() else int(resp.get("ContentLength") or 0)
            if total > max_bytes:
                raise too_large(loc.uri, total, max_bytes)
            data = body.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise too_large(loc.uri, len(data), max_bytes)
            return Fetched(data, _etag(resp))
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a connection lost mid-body
            raise s3_error(exc, loc.uri) from None
        finally:
            body.close()

    def matches(self, loc: Location, data: bytes) -> ObjectInfo | None:
        """S3's ETag of a simple put is the MD5 of its bytes: no need to download the object."""
        try:
            info = self.head(loc)
        except StorageError:
            return None
        same = info.size == len(data) and info.version == hashlib.md5(data, usedforsecurity=False).hexdigest()
        return info if same else None

    def put(self, loc: Location, data: bytes, content_type: str | None = None) -> ObjectInfo:
        kwargs = {"Bucket": loc.bucket, "Key": loc.key, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        try:
            resp = self.client().put_object(**kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise s3_error(exc, loc.uri) from None
        return ObjectInfo(size=len(data), version=_etag(resp))
