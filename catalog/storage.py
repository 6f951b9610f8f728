"""Object storage for product images: ``s3://bucket/prefix`` (boto3) and ``file:///abs/path``.

Two things live here. A :class:`Store` is *our* bucket or folder, where importers put images. An
:class:`ImageReader` reads arbitrary catalog image URIs for the workers, and is the security
boundary: every URI is checked against ``STYLETAG_ALLOWED_IMAGE_PREFIXES`` (no other scheme, bucket
or folder, no ``..``), and objects over the size limit are refused before their bytes are fetched.

S3 endpoint and credentials come only from boto3's own environment (``AWS_ENDPOINT_URL``, ...); this
module never reads a secret, and error messages name the URI and the error code, nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from catalog.errors import (
    ConfigError,
    ForbiddenURI,
    ObjectMissing,
    ObjectTooLarge,
    StorageError,
    TransientStorageError,
)

MAX_URI_LENGTH = 2048
SCHEMES = ("s3", "file")
S3_MAX_ATTEMPTS = int(os.environ.get("STYLETAG_S3_MAX_ATTEMPTS", "5") or 5)
# One pooled connection per fetch thread, plus headroom for puts and a second reader in the process.
S3_POOL_CONNECTIONS = max(int(os.environ.get("STYLETAG_FETCH_THREADS", "16") or 16) * 2, 32)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    version: str  # S3 ETag (unquoted), or the MD5 of a file's bytes (what S3 reports for simple puts)


@dataclass(frozen=True)
class Location:
    """A checked URI: ``bucket`` and ``key`` for S3, an absolute ``path`` for files."""

    uri: str
    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""


# --- URI checks -------------------------------------------------------------------------------------


def _fully_unquoted(text: str) -> str:
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def parse_uri(uri: str) -> Location:
    """Parse and normalise a URI without checking prefixes; anything odd is a ForbiddenURI."""
    if not isinstance(uri, str) or not uri:
        raise ForbiddenURI("empty image URI")
    if len(uri) > MAX_URI_LENGTH:
        raise ForbiddenURI(f"image URI longer than {MAX_URI_LENGTH} characters ({len(uri)})")
    shown = uri[:200]
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in uri):
        raise ForbiddenURI(f"control character in image URI {shown!r}")
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise ForbiddenURI(f"malformed image URI {shown!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ForbiddenURI(f"scheme {parts.scheme or '(none)'!r} not allowed in {shown!r}; use s3:// or file://")
    if parts.query or parts.fragment:
        raise ForbiddenURI(f"query or fragment not allowed in image URI {shown!r}")
    raw_path = parts.path
    decoded = _fully_unquoted(raw_path)
    if any(seg == ".." for seg in decoded.replace("\\", "/").split("/")):
        raise ForbiddenURI(f"'..' path segment in image URI {shown!r}")
    if "\x00" in decoded:
        raise ForbiddenURI(f"NUL byte in image URI {shown!r}")
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or "@" in bucket or ":" in bucket:
            raise ForbiddenURI(f"bad bucket in image URI {shown!r}")
        key = raw_path.lstrip("/")  # S3 keys are literal (the AWS CLI convention), not percent-encoded
        return Location(uri=f"s3://{bucket}/{key}", scheme="s3", bucket=bucket, key=key)
    if parts.netloc not in ("", "localhost"):
        raise ForbiddenURI(f"file URI with a host is not allowed: {shown!r}")
    path = unquote(raw_path)
    if not path.startswith("/"):
        raise ForbiddenURI(f"file URI must be absolute: {shown!r}")
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return Location(uri="file://" + quote(path), scheme="file", path=path)


def _under(loc: Location, prefix: Location) -> bool:
    """Prefix match on path-segment boundaries: ``img/`` admits ``img/a`` but never ``imgX/a``."""
    if loc.scheme != prefix.scheme:
        return False
    if loc.scheme == "s3":
        if loc.bucket != prefix.bucket:
            return False
        base = prefix.key.rstrip("/")
        return base == "" or loc.key == base or loc.key.startswith(base + "/")
    base = prefix.path.rstrip("/")
    return base == "" or loc.path == base or loc.path.startswith(base + "/")


def check_uri(uri: str, allowed_prefixes: Sequence[str]) -> Location:
    """Return the parsed URI if it is allowed, else raise ForbiddenURI (never retried)."""
    loc = parse_uri(uri)
    for prefix in allowed_prefixes:
        try:
            if _under(loc, parse_uri(prefix)):
                return loc
        except ForbiddenURI:
            continue
    raise ForbiddenURI(f"image URI {uri[:200]!r} is outside the allowed prefixes (STYLETAG_ALLOWED_IMAGE_PREFIXES)")


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or len(key) > 1024:
        raise ForbiddenURI(f"bad object key {key[:200]!r}")
    if any(seg in ("..", ".") for seg in _fully_unquoted(key).replace("\\", "/").split("/")):
        raise ForbiddenURI(f"'..' or '.' segment in object key {key[:200]!r}")
    return key


# --- S3 ---------------------------------------------------------------------------------------------

_client_lock = threading.Lock()
_client_cache: dict[tuple, object] = {}


def s3_client():
    """The process's one S3 client (thread-safe to share; boto3 *sessions* are not, so create it once
    under a lock). Re-created after fork so that a child never shares the parent's sockets."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    client = _client_cache.get(key)
    if client is not None:
        return client
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                max_pool_connections=S3_POOL_CONNECTIONS,
                connect_timeout=5,
                read_timeout=30,
            )
            client = boto3.session.Session().client("s3", config=config)
            _client_cache.clear()
            _client_cache[key] = client
    return client


def reset_s3_client() -> None:
    """Forget the cached client (tests that change the endpoint; after credentials rotate)."""
    with _client_lock:
        _client_cache.clear()


_MISSING_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _s3_error(exc: Exception, uri: str) -> StorageError:
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
        return StorageError(f"no S3 credentials for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    if isinstance(exc, BotoCoreError):
        return TransientStorageError(f"S3 unreachable for {uri}: {exc.__class__.__name__}; retry later")
    return TransientStorageError(f"S3 read failed for {uri}: {exc.__class__.__name__}")


def _s3_head(loc: Location) -> ObjectInfo:
    try:
        resp = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:  # noqa: BLE001 - mapped to typed errors
        raise _s3_error(exc, loc.uri) from None
    return ObjectInfo(size=int(resp["ContentLength"]), version=str(resp.get("ETag", "")).strip('"'))


def _s3_get(loc: Location, max_bytes: int | None) -> bytes:
    kwargs = {"Bucket": loc.bucket, "Key": loc.key}
    if max_bytes is not None:
        kwargs["Range"] = f"bytes=0-{max_bytes}"  # never more than max_bytes+1, even if it grew
    try:
        resp = s3_client().get_object(**kwargs)
        body = resp["Body"]
        try:
            return body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
    except Exception as exc:  # noqa: BLE001 - mapped to typed errors
        raise _s3_error(exc, loc.uri) from None


def _s3_get_checked(loc: Location, max_bytes: int) -> tuple[bytes, int]:
    """One ranged GET for the image read: ``bytes=0-max_bytes`` caps the transfer at ``max_bytes + 1``
    and the reply's ``Content-Range: bytes 0-N/TOTAL`` gives the object's size, so the size check needs
    no HEAD (one request per image instead of two). Returns (data, total size); the body of an object
    over the limit is not read. A range on an empty object is unsatisfiable (416): that is an empty object."""
    from botocore.exceptions import ClientError

    try:
        resp = s3_client().get_object(Bucket=loc.bucket, Key=loc.key, Range=f"bytes=0-{max_bytes}")
    except ClientError as exc:
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if err.get("Code") == "InvalidRange" or status == 416:
            return b"", 0
        raise _s3_error(exc, loc.uri) from None
    except Exception as exc:  # noqa: BLE001 - mapped to typed errors
        raise _s3_error(exc, loc.uri) from None
    body = resp["Body"]
    try:
        # "bytes 0-N/TOTAL"; a store that ignores Range sends the whole object: then ContentLength
        size = str(resp.get("ContentRange") or "").rpartition("/")[2]
        total = int(size) if size.isdigit() else int(resp.get("ContentLength") or 0)
        if total > max_bytes:
            return b"", total
        return body.read(max_bytes + 1), total
    except Exception as exc:  # noqa: BLE001 - a connection lost mid-body
        raise _s3_error(exc, loc.uri) from None
    finally:
        body.close()


# --- files ------------------------------------------------------------------------------------------


def _md5_file(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Errors of a local or network file system that may go away; any other error is about the path itself
# (too long, a symlink loop, ...) and retrying it would only delay the batch.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EMFILE,
                     errno.ENFILE, errno.ENOMEM, errno.EBUSY, errno.ENOLCK}


def _file_error(exc: OSError, uri: str) -> StorageError:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return ObjectMissing(f"no object at {uri[:200]}")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied reading {uri[:200]}")
    if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return ForbiddenURI(f"image URI {uri[:200]!r} names no readable file: {exc.strerror}")
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientStorageError(f"cannot read {uri[:200]}: {exc.strerror or exc.__class__.__name__}")
    return StorageError(f"cannot read {uri[:200]}: {exc.strerror or exc.__class__.__name__}")


def _not_regular(uri: str) -> ForbiddenURI:
    return ForbiddenURI(f"image URI {uri[:200]!r} is not a regular file (directory, FIFO or device)")


def _file_head(loc: Location) -> ObjectInfo:
    try:
        size = os.stat(loc.path).st_size
        return ObjectInfo(size=size, version=_md5_file(loc.path))
    except OSError as exc:
        raise _file_error(exc, loc.uri) from None


def _file_get(path: str, uri: str, max_bytes: int | None) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except OSError as exc:
        raise _file_error(exc, uri) from None


# --- stores -----------------------------------------------------------------------------------------


class Store:
    """Our own bucket or folder: where importers write images and from which URIs are derived."""

    url: str

    def uri_for(self, key: str) -> str:
        raise NotImplementedError

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        raise NotImplementedError

    def _locate(self, uri_or_key: str) -> Location:
        if "://" in uri_or_key:
            return check_uri(uri_or_key, (self.url,))
        return parse_uri(self.uri_for(_check_key(uri_or_key)))

    def get(self, uri_or_key: str) -> bytes:
        return read_location(self._locate(uri_or_key), None)

    def head(self, uri_or_key: str) -> ObjectInfo:
        return head_location(self._locate(uri_or_key))

    def exists(self, uri_or_key: str) -> bool:
        try:
            self.head(uri_or_key)
        except ObjectMissing:
            return False
        return True


class FileStore(Store):
    def __init__(self, root: str):
        self.root = posixpath.normpath(root)
        self.url = Path(self.root).as_uri()
        self._made_dirs: set[Path] = set()  # skip a mkdir syscall per put on bulk imports

    def uri_for(self, key: str) -> str:
        return Path(self.root, _check_key(key)).as_uri()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        """Write atomically (temp file + rename) so a reader never sees half an image."""
        path = Path(self.root, _check_key(key))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if path.parent not in self._made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made_dirs.add(path.parent)
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path.as_uri()}: {exc.strerror or exc.__class__.__name__}") from None
        return ObjectInfo(size=len(data), version=hashlib.md5(data, usedforsecurity=False).hexdigest())


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def uri_for(self, key: str) -> str:
        _check_key(key)
        return f"s3://{self.bucket}/{self.prefix}/{key}" if self.prefix else f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes, content_type: str | None = None) -> ObjectInfo:
        loc = parse_uri(self.uri_for(key))
        kwargs = {"Bucket": loc.bucket, "Key": loc.key, "Body": data}
        if content_type:
            kwargs["ContentType"] = content_type
        try:
            resp = s3_client().put_object(**kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise _s3_error(exc, loc.uri) from None
        return ObjectInfo(size=len(data), version=str(resp.get("ETag", "")).strip('"'))


def open_store(url: str) -> Store:
    """The store for ``s3://bucket[/prefix]`` or ``file:///abs/path``; anything else is a ConfigError."""
    try:
        loc = parse_uri(url)
    except ForbiddenURI as exc:
        raise ConfigError(f"bad store URL {url[:200]!r}: {exc}") from None
    if loc.scheme == "s3":
        return S3Store(loc.bucket, loc.key)
    return FileStore(loc.path)


def head_location(loc: Location) -> ObjectInfo:
    return _s3_head(loc) if loc.scheme == "s3" else _file_head(loc)


def read_location(loc: Location, max_bytes: int | None) -> bytes:
    return _s3_get(loc, max_bytes) if loc.scheme == "s3" else _file_get(loc.path, loc.uri, max_bytes)


# --- the reader for catalog image URIs --------------------------------------------------------------


class ImageReader:
    """Reads catalog image URIs within ``allowed_prefixes``, refusing objects over ``max_bytes``."""

    def __init__(self, allowed_prefixes: Sequence[str], max_bytes: int):
        if not allowed_prefixes:
            raise ConfigError("no allowed image prefixes; set STYLETAG_ALLOWED_IMAGE_PREFIXES")
        self.allowed_prefixes = tuple(allowed_prefixes)
        self.max_bytes = int(max_bytes)
        # Real paths of the file prefixes, so that a symlink cannot lead a read outside them.
        self._real_file_prefixes = tuple(
            Location(uri="", scheme="file", path=os.path.realpath(loc.path))
            for loc in (self._parse_prefix(p) for p in self.allowed_prefixes)
            if loc is not None and loc.scheme == "file"
        )

    @staticmethod
    def _parse_prefix(prefix: str) -> Location | None:
        try:
            return parse_uri(prefix)
        except ForbiddenURI:
            return None

    def _real_path(self, loc: Location) -> str:
        real = os.path.realpath(loc.path)
        probe = Location(uri=loc.uri, scheme="file", path=real)
        if not any(_under(probe, p) for p in self._real_file_prefixes):
            raise ForbiddenURI(f"image URI {loc.uri[:200]!r} resolves (through a symlink) outside the allowed prefixes")
        return real

    def head(self, uri: str) -> ObjectInfo:
        loc = check_uri(uri, self.allowed_prefixes)
        if loc.scheme == "file":
            loc = Location(uri=loc.uri, scheme="file", path=self._real_path(loc))
            try:
                mode = os.stat(loc.path).st_mode
            except OSError as exc:
                raise _file_error(exc, loc.uri) from None
            if not stat.S_ISREG(mode):
                raise _not_regular(loc.uri)
        return head_location(loc)

    def _too_large(self, uri: str, size: int) -> ObjectTooLarge:
        return ObjectTooLarge(f"object {uri[:200]} is {size} bytes, over the limit of {self.max_bytes}")

    def get(self, uri: str) -> bytes:
        """Check, size-check (fstat / the ranged GET's Content-Range) and read at most ``max_bytes + 1``
        bytes."""
        loc = check_uri(uri, self.allowed_prefixes)
        if loc.scheme == "file":
            data = self._read_file(loc)
        else:
            data, size = _s3_get_checked(loc, self.max_bytes)
            if size > self.max_bytes:
                raise self._too_large(loc.uri, size)
        if len(data) > self.max_bytes:  # it grew between the size check and the read
            raise self._too_large(loc.uri, len(data))
        return data

    def _read_file(self, loc: Location) -> bytes:
        """Open the resolved path without following a symlink swapped in since the check (O_NOFOLLOW)
        and without blocking on a FIFO (O_NONBLOCK); size and type come from the open descriptor, so
        what is checked is what is read. Only regular files are read."""
        path = self._real_path(loc)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ForbiddenURI(f"image URI {loc.uri[:200]!r} became a symlink while being read") from None
            raise _file_error(exc, loc.uri) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_regular(loc.uri)
            if info.st_size > self.max_bytes:
                raise self._too_large(loc.uri, info.st_size)
            chunks, left = [], self.max_bytes + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise _file_error(exc, loc.uri) from None
        finally:
            os.close(fd)

    def _get_or_error(self, uri: str) -> bytes | StorageError:
        try:
            return self.get(uri)
        except StorageError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one bad item must not fail the whole batch
            return TransientStorageError(f"reading {str(uri)[:200]} failed: {exc.__class__.__name__}")

    def get_many(self, uris: Sequence[str], max_workers: int = 16) -> list[bytes | StorageError]:
        """Fetch concurrently; results in input order, each a payload or the error for that item."""
        if not uris:
            return []
        workers = max(1, min(max_workers, len(uris)))
        if workers == 1:
            return [self._get_or_error(u) for u in uris]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="styletag-fetch") as pool:
            return list(pool.map(self._get_or_error, uris))
