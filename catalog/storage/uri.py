"""The URI rules, in one place: parse and normalise an image URI, and check it against the allowed prefixes.

Every scheme shares the same refusals (length, control characters, query or fragment, a ``..`` segment
in any encoding, a NUL byte); its backend's ``syntax`` (one of the functions at the end) reads the rest.
A prefix admits a URI when scheme, bucket or host and port are equal and the path starts with the
prefix's path on a segment boundary: ``img/`` admits ``img/a`` but never ``imgX/a``.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urlsplit

from catalog.errors import ForbiddenURI
from catalog.storage import registry

MAX_URI_LENGTH = 2048
DEFAULT_PORTS = {"https": 443, "http": 80}
_HTTP_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``bucket`` and ``key`` for S3, an absolute ``path`` for files, ``host``, ``port``
    and the (percent-encoded) request ``path`` for HTTP."""

    uri: str
    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def name(self) -> str:
        """What a prefix must lead: the key or the path."""
        return self.key or self.path


def fully_unquoted(text: str) -> str:
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
        uri.encode("utf-8")
        parts = urlsplit(uri)
    except (UnicodeError, ValueError):
        raise ForbiddenURI(f"malformed image URI {shown!r}") from None
    scheme = parts.scheme.lower()
    backend = registry.backend_class(scheme)
    if backend is None:
        known = ", ".join(f"{s}://" for s in registry.schemes())
        raise ForbiddenURI(f"scheme {parts.scheme or '(none)'!r} not allowed in {shown!r}; use {known}")
    if parts.query or parts.fragment:
        raise ForbiddenURI(f"query or fragment not allowed in image URI {shown!r}")
    decoded = fully_unquoted(parts.path)
    if any(seg == ".." for seg in decoded.replace("\\", "/").split("/")):
        raise ForbiddenURI(f"'..' path segment in image URI {shown!r}")
    if "\x00" in decoded:
        raise ForbiddenURI(f"NUL byte in image URI {shown!r}")
    return backend.syntax(scheme, parts, shown)


def under(loc: Location, prefix: Location) -> bool:
    """Prefix match on scheme, bucket, host, port and then path segments."""
    if (loc.scheme, loc.bucket, loc.host, loc.port) != (prefix.scheme, prefix.bucket, prefix.host,
                                                         prefix.port):
        return False
    base = prefix.name.rstrip("/")
    return base == "" or loc.name == base or loc.name.startswith(base + "/")


def parse_prefixes(prefixes: Sequence[str | Location]) -> tuple[Location, ...]:
    """The prefixes that parse (a malformed one admits nothing)."""
    out = []
    for prefix in prefixes:
        if isinstance(prefix, Location):
            out.append(prefix)
            continue
        try:
            out.append(parse_uri(prefix))
        except ForbiddenURI:
            continue
    return tuple(out)


def check_uri(uri: str, allowed_prefixes: Sequence[str | Location]) -> Location:
    """Return the parsed URI if it is allowed, else raise ForbiddenURI (never retried)."""
    loc = parse_uri(uri)
    prefixes = parse_prefixes(allowed_prefixes)
    if not any(p.scheme == loc.scheme for p in prefixes):
        named = ", ".join(sorted({f"{p.scheme}://" for p in prefixes})) or "nothing"
        raise ForbiddenURI(f"scheme {loc.scheme!r} not allowed in {uri[:200]!r}; the allowed prefixes "
                           f"(STYLETAG_ALLOWED_IMAGE_PREFIXES) name {named}")
    if any(under(loc, p) for p in prefixes):
        return loc
    raise ForbiddenURI(f"image URI {uri[:200]!r} is outside the allowed prefixes "
                       "(STYLETAG_ALLOWED_IMAGE_PREFIXES)")


def check_key(key: str) -> str:
    """A store key: relative, no ``.`` or ``..`` segment in any encoding, at most 1024 characters."""
    if not isinstance(key, str) or not key or key.startswith("/") or len(key) > 1024:
        raise ForbiddenURI(f"bad object key {str(key)[:200]!r}")
    if any(seg in ("..", ".") for seg in fully_unquoted(key).replace("\\", "/").split("/")):
        raise ForbiddenURI(f"'..' or '.' segment in object key {key[:200]!r}")
    return key


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- the syntax of each kind of URI (a backend names one as its ``syntax``) ----------------------------


def bucket_key(scheme: str, parts: SplitResult, shown: str) -> Location:
    """``s3://bucket/key``: keys are literal (the AWS CLI convention), not percent-encoded."""
    bucket = parts.netloc
    if not bucket or "@" in bucket or ":" in bucket:
        raise ForbiddenURI(f"bad bucket in image URI {shown!r}")
    key = parts.path.lstrip("/")
    return Location(uri=f"{scheme}://{bucket}/{key}", scheme=scheme, bucket=bucket, key=key)


def local_path(scheme: str, parts: SplitResult, shown: str) -> Location:
    """``file:///abs/path`` (or ``file://localhost/abs/path``), percent-decoded and normalised."""
    if parts.netloc not in ("", "localhost"):
        raise ForbiddenURI(f"file URI with a host is not allowed: {shown!r}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ForbiddenURI(f"file URI must be absolute: {shown!r}")
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return Location(uri=f"{scheme}://" + quote(path), scheme=scheme, path=path)


def host_path(scheme: str, parts: SplitResult, shown: str) -> Location:
    """``https://host[:port]/path``: no user or password, an ASCII host name or an IP literal, the
    scheme's port when none is given; the path stays percent-encoded, as it is sent."""
    if "@" in parts.netloc:
        raise ForbiddenURI(f"user name or password in image URI {shown!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ForbiddenURI(f"bad port in image URI {shown!r}") from None
    if not host or not host.isascii() or any(ch in host for ch in "%/\\ []"):
        raise ForbiddenURI(f"bad host in image URI {shown!r}")
    port = port or DEFAULT_PORTS[scheme]
    path = quote(parts.path or "/", safe=_HTTP_PATH_SAFE)
    if not path.startswith("/"):
        raise ForbiddenURI(f"bad path in image URI {shown!r}")
    netloc = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return Location(uri=f"{scheme}://{netloc}{path}", scheme=scheme, host=host, port=port, path=path)
