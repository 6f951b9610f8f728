"""``https://`` (and, where a prefix names it, ``http://``) image sources such as a CDN.

Each request resolves the host once, refuses it if a name resolves to a loopback, private, link-local,
multicast, unspecified or reserved address (only a prefix that names the IP literally reaches such an
address), and connects to exactly the address it checked, so that no second DNS answer can slip in; TLS is
verified as usual, against the host name. Redirects are followed (at most 5) while every hop stays inside
an allowed prefix. Bodies are capped at the byte limit: refused on their Content-Length, and cut off while
streaming. The version is the ETag, else Content-Length and Last-Modified, else the SHA-256 of the body.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import socket
import ssl
from urllib.parse import urljoin

from catalog.errors import ForbiddenURI, ObjectMissing, StorageError, TransientStorageError
from catalog.settings import Settings
from catalog.storage import uri as uris
from catalog.storage.registry import Fetched, ObjectInfo, too_large
from catalog.storage.uri import Location

MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
_MAX_VERSION = 96  # products.image_version is 128 characters; a longer ETag is hashed
# The two calls that touch DNS and the network, named so that tests can watch them.
_getaddrinfo = socket.getaddrinfo
_create_connection = socket.create_connection


def special_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes an address off limits for a host name, or None for a public address."""
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-global"


def _version(headers: http.client.HTTPMessage, size: int | None) -> str | None:
    etag = (headers.get("ETag") or "").strip()
    if etag:
        weak = etag.startswith("W/")
        version = ("W/" if weak else "") + etag.removeprefix("W/").strip('"')
    elif headers.get("Last-Modified") and size is not None:
        version = f"{size}-{headers['Last-Modified'].strip()}"
    else:
        return None
    if len(version) > _MAX_VERSION:
        version = "h:" + hashlib.sha256(version.encode("utf-8", "replace")).hexdigest()
    return version


class HttpBackend:
    schemes = ("https", "http")
    syntax = staticmethod(uris.host_path)

    def __init__(self, allowed=(), *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 max_bytes: int = Settings.max_image_bytes, ssl_context: ssl.SSLContext | None = None):
        self.allowed = tuple(p for p in uris.parse_prefixes(allowed) if p.scheme in self.schemes)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_bytes = max_bytes  # for a ``head`` that has to GET the body to know its version
        self._ssl_context = ssl_context

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The system's trust store, verified as usual (made on first use: loading it takes a while)."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpBackend:
        return cls(settings.allowed_image_prefixes, connect_timeout=settings.http_connect_timeout,
                   read_timeout=settings.http_read_timeout, max_bytes=settings.max_image_bytes)

    def head(self, loc: Location) -> ObjectInfo:
        status, headers, _ = self._exchange("HEAD", loc, None)
        length = headers.get("Content-Length", "").strip()
        if status == 200 and length.isdigit():
            version = _version(headers, int(length))
            if version:
                return ObjectInfo(int(length), version)
        fetched = self.read(loc, self.max_bytes)  # no usable headers (or no HEAD): the body decides
        return ObjectInfo(len(fetched.data), fetched.version)

    def read(self, loc: Location, max_bytes: int | None) -> Fetched:
        _, headers, data = self._exchange("GET", loc, max_bytes)
        version = _version(headers, len(data)) or "sha256:" + hashlib.sha256(data).hexdigest()
        return Fetched(data, version)

    # -- one request, its redirects, its errors
    def _exchange(self, method: str, loc: Location, max_bytes: int | None):
        current = self._check(loc.uri)
        for _ in range(MAX_REDIRECTS + 1):
            conn = None
            try:
                conn = self._connect(current, loc)
                conn.putrequest(method, current.path, skip_host=True, skip_accept_encoding=True)
                default = uris.DEFAULT_PORTS[current.scheme]
                host = f"[{current.host}]" if ":" in current.host else current.host
                conn.putheader("Host", host if current.port == default else f"{host}:{current.port}")
                conn.putheader("Accept-Encoding", "identity")
                conn.putheader("User-Agent", "styletag")
                conn.endheaders()
                resp = conn.getresponse()
                if resp.status in _REDIRECTS and resp.getheader("Location"):
                    target = urljoin(current.uri, resp.getheader("Location", ""))
                    current = self._check(target, f"redirect from {current.uri[:200]} to {target[:200]!r}")
                    continue
                if method == "HEAD" and resp.status in (405, 501):
                    return resp.status, resp.headers, b""
                if resp.status != 200:
                    raise _status_error(resp.status, loc.uri)
                data = b"" if method == "HEAD" else _read_body(resp, loc.uri, max_bytes)
                return resp.status, resp.headers, data
            except ssl.SSLCertVerificationError as exc:
                raise StorageError(f"TLS certificate of {current.host} not trusted for {loc.uri[:200]}: "
                                   f"{exc.verify_message}") from None
            except TimeoutError:
                raise TransientStorageError(f"timed out reading {loc.uri[:200]}; retry later") from None
            except (OSError, http.client.HTTPException) as exc:
                raise TransientStorageError(f"cannot read {loc.uri[:200]}: {exc.__class__.__name__}; "
                                            "retry later") from None
            finally:
                if conn is not None:
                    conn.close()
        raise StorageError(f"more than {MAX_REDIRECTS} redirects for {loc.uri[:200]}")

    def _check(self, target: str, what: str = "") -> Location:
        try:
            return uris.check_uri(target, self.allowed)
        except ForbiddenURI as exc:
            raise ForbiddenURI(f"{what}: {exc}" if what else str(exc)) from None

    def _addresses(self, loc: Location, original: Location) -> list[str]:
        """The addresses to connect to. An IP literal was named by the prefix that admitted it; every
        address a host name resolves to must be public."""
        if uris.is_ip_literal(loc.host):
            return [loc.host]
        try:
            infos = _getaddrinfo(loc.host, loc.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None)):
                raise TransientStorageError(
                    f"cannot resolve {loc.host} for {original.uri[:200]}; retry later") from None
            raise StorageError(f"host {loc.host} of {original.uri[:200]} does not resolve") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            kind = special_address(ipaddress.ip_address(address.split("%", 1)[0]))
            if kind:
                raise ForbiddenURI(f"image URI {original.uri[:200]!r}: host {loc.host} resolves to the "
                                   f"{kind} address {address}; only a prefix naming that address "
                                   "literally allows it")
        if not addresses:
            raise StorageError(f"host {loc.host} of {original.uri[:200]} does not resolve")
        return addresses

    def _connect(self, loc: Location, original: Location) -> http.client.HTTPConnection:
        sock, error = None, None
        for address in self._addresses(loc, original):
            try:
                sock = _create_connection((address, loc.port), timeout=self.connect_timeout)
                break
            except OSError as exc:
                error = exc
        if sock is None:
            kind = "timed out connecting to" if isinstance(error, TimeoutError) else "cannot connect to"
            raise TransientStorageError(f"{kind} {loc.host}:{loc.port} for {original.uri[:200]}; retry later")
        conn = http.client.HTTPConnection(loc.host, loc.port, timeout=self.read_timeout)
        try:
            sock.settimeout(self.read_timeout)
            if loc.scheme == "https":
                sock = self.ssl_context.wrap_socket(sock, server_hostname=loc.host)
        except BaseException:
            sock.close()
            raise
        conn.sock = sock
        return conn


def _status_error(status: int, uri: str) -> StorageError:
    if status in (404, 410):
        return ObjectMissing(f"no object at {uri[:200]} (HTTP {status})")
    if status == 429 or status >= 500:
        return TransientStorageError(f"HTTP {status} for {uri[:200]}; retry later")
    return StorageError(f"HTTP {status} for {uri[:200]}")


def _read_body(resp: http.client.HTTPResponse, uri: str, max_bytes: int | None) -> bytes:
    length = (resp.getheader("Content-Length") or "").strip()
    declared = int(length) if length.isdigit() else None
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise too_large(uri, declared, max_bytes)
    chunks, total = [], 0
    while chunk := resp.read(1 << 16 if max_bytes is None else min(1 << 16, max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise too_large(uri, total if declared is None else max(declared, total), max_bytes)
    if declared is not None and total != declared:
        raise TransientStorageError(f"{uri[:200]}: body cut short ({total} of {declared} bytes); retry later")
    return b"".join(chunks)
