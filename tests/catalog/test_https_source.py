"""https:// (and explicitly allowed http://) image sources, against real HTTP servers started here: a plain
one on loopback (named by an ``http://127.0.0.1:PORT/`` prefix) and a TLS one with a self-signed
certificate. Every refusal is checked against a server that *would* answer, so that each test fails if
the guard it tests is missing: the server counts what it was asked for."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from catalog.errors import ForbiddenURI, ObjectMissing, ObjectTooLarge, StorageError, TransientStorageError
from catalog.settings import Settings
from catalog.storage import Fetched, HttpBackend, ImageReader, ObjectInfo, check_uri
from catalog.storage import https as https_backend

MAX = 1000
PHOTO = b"\x89PNG" + b"p" * 500
SECRET = b"SECRET, outside the prefix"
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        path = self.path
        self.server.hits[(self.command, path)] += 1
        self.server.hosts.append(self.headers.get("Host"))
        if path == "/img/a.png":
            return self._send(200, PHOTO, {"ETag": '"photo-v1"'}, head)
        if path == "/img/exact.png":
            return self._send(200, b"x" * MAX, {"ETag": '"exact"'}, head)
        if path == "/img/lm.png":
            return self._send(200, PHOTO, {"Last-Modified": LAST_MODIFIED}, head)
        if path == "/img/plain.png":
            return self._send(200, PHOTO, {}, head)
        if path == "/private/secret.png":
            return self._send(200, SECRET, {}, head)
        if path.startswith("/img/status-"):
            return self._send(int(path.rsplit("-", 1)[1].split(".")[0]), b"no", {}, head)
        if path == "/img/redirect-in.png":
            return self._send(302, b"", {"Location": "/img/hop.png"}, head)
        if path == "/img/hop.png":
            return self._send(301, b"", {"Location": f"http://127.0.0.1:{self.server.port}/img/a.png"}, head)
        if path == "/img/redirect-out.png":
            return self._send(302, b"", {"Location": "/private/secret.png"}, head)
        if path == "/img/redirect-host.png":
            return self._send(307, b"", {"Location": f"http://localhost:{self.server.port}/img/a.png"}, head)
        if path == "/img/loop.png":
            return self._send(302, b"", {"Location": "/img/loop.png"}, head)
        if path == "/img/slow.png":
            time.sleep(3)
            return self._send(200, PHOTO, {}, head)
        if path == "/img/big-declared.png":  # declares 50 kB, then sends nothing for a while
            self.send_response(200)
            self.send_header("Content-Length", str(50 * MAX))
            self.end_headers()
            self.wfile.flush()
            time.sleep(3)
            return None
        if path in ("/img/big-streamed.png", "/img/big-chunked.png"):
            return self._endless(chunked=path.endswith("chunked.png"))
        return self._send(404, b"not found", {}, head)

    def _send(self, status: int, body: bytes, headers: dict, head: bool):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _endless(self, chunked: bool):
        """A body without Content-Length that never ends (close-delimited or chunked): only a reader that
        stops at the limit gets anywhere."""
        self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = b"z" * 4096
        try:
            for _ in range(20_000):  # 80 MB at most, then give up
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                self.server.streamed += len(block)
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self.hits: Counter = Counter()
        self.hosts: list[str] = []
        self.streamed = 0
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _reader(prefixes, **settings) -> ImageReader:
    base = Settings(http_connect_timeout=2.0, http_read_timeout=1.0)
    settings = replace(base, allowed_image_prefixes=tuple(prefixes), max_image_bytes=MAX, **settings)
    return ImageReader.from_settings(settings)


@pytest.fixture
def reader(server):
    return _reader([f"http://127.0.0.1:{server.port}/img/"])


def url(server, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
    return f"{scheme}://{host}:{server.port}{path}"


def test_fetch_and_head_give_bytes_and_the_etag(server, reader):
    assert reader.fetch(url(server, "/img/a.png")) == Fetched(PHOTO, "photo-v1")
    assert reader.get(url(server, "/img/a.png")) == PHOTO
    assert reader.head(url(server, "/img/a.png")) == ObjectInfo(len(PHOTO), "photo-v1")
    assert server.hits[("HEAD", "/img/a.png")] == 1 and server.hits[("GET", "/img/a.png")] == 2
    assert server.hosts[0] == f"127.0.0.1:{server.port}"
    assert len(reader.get(url(server, "/img/exact.png"))) == MAX


def test_version_without_etag(server, reader):
    lm = reader.fetch(url(server, "/img/lm.png"))
    assert lm.version == f"{len(PHOTO)}-{LAST_MODIFIED}" == reader.head(url(server, "/img/lm.png")).version
    plain = reader.fetch(url(server, "/img/plain.png"))
    assert plain.version == "sha256:" + hashlib.sha256(PHOTO).hexdigest()
    gets = server.hits[("GET", "/img/plain.png")]
    assert reader.head(url(server, "/img/plain.png")) == ObjectInfo(len(PHOTO), plain.version)
    assert server.hits[("GET", "/img/plain.png")] == gets + 1  # no usable header: head had to GET


@pytest.mark.parametrize(("status", "error"), [
    (404, ObjectMissing), (410, ObjectMissing), (503, TransientStorageError), (500, TransientStorageError),
    (429, TransientStorageError), (403, StorageError), (418, StorageError)])
def test_status_errors_are_typed(server, reader, status, error):
    for call in (reader.fetch, reader.head):
        with pytest.raises(error) as info:
            call(url(server, f"/img/status-{status}.png"))
        assert type(info.value) is error
        assert f"HTTP {status}" in str(info.value)
    with pytest.raises(ObjectMissing):
        reader.get(url(server, "/img/nothing-here.png"))


def test_read_timeout(server, reader):
    t0 = time.monotonic()
    with pytest.raises(TransientStorageError, match="timed out"):
        reader.get(url(server, "/img/slow.png"))
    assert time.monotonic() - t0 < 2.5  # the read timeout (1 s), not the server's 3 s


def test_connect_timeout(server):
    """A listening socket whose accept queue is full drops new SYNs: connecting hangs until the timeout."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(64):  # fill the accept queue until a connect no longer completes
                s = socket.socket()
                s.settimeout(0.2)
                fillers.append(s)
                try:
                    s.connect(("127.0.0.1", port))
                except TimeoutError:
                    break
            else:
                pytest.skip("could not fill the accept queue of a loopback socket")
            reader = _reader([f"http://127.0.0.1:{port}/img/"], http_connect_timeout=0.3,
                             http_read_timeout=10.0)
            t0 = time.monotonic()
            with pytest.raises(TransientStorageError, match="timed out connecting"):
                reader.get(f"http://127.0.0.1:{port}/img/a.png")
            assert time.monotonic() - t0 < 3  # the connect timeout, not the read timeout
        finally:
            for s in fillers:
                s.close()


def test_too_large_with_content_length_is_refused_before_the_body(server, reader):
    t0 = time.monotonic()
    with pytest.raises(ObjectTooLarge, match=f"{50 * MAX} bytes, over the limit of {MAX}"):
        reader.get(url(server, "/img/big-declared.png"))
    assert time.monotonic() - t0 < 1.0  # it did not wait for the body (the server sends none for 3 s)


@pytest.mark.parametrize("kind", ["streamed", "chunked"])
def test_too_large_without_content_length_is_cut_off(server, reader, kind):
    with pytest.raises(ObjectTooLarge, match=f"over the limit of {MAX}"):
        reader.get(url(server, f"/img/big-{kind}.png"))
    time.sleep(0.2)
    assert server.streamed < 10 * 1024 * 1024  # the endless body was abandoned, not read to the end


def test_redirect_inside_the_prefix_is_followed(server, reader):
    assert reader.fetch(url(server, "/img/redirect-in.png")) == Fetched(PHOTO, "photo-v1")
    assert server.hits[("GET", "/img/hop.png")] == 1


def test_redirect_out_of_the_prefix_is_refused(server, reader):
    with pytest.raises(ForbiddenURI, match="redirect from .* outside the allowed prefixes"):
        reader.get(url(server, "/img/redirect-out.png"))
    with pytest.raises(ForbiddenURI, match="redirect from"):
        reader.head(url(server, "/img/redirect-out.png"))
    assert server.hits[("GET", "/private/secret.png")] == server.hits[("HEAD", "/private/secret.png")] == 0
    # the same target, allowed by a second prefix, is followed: the refusal was the prefix's
    both = _reader([f"http://127.0.0.1:{server.port}/img/", f"http://127.0.0.1:{server.port}/private/"])
    assert both.get(url(server, "/img/redirect-out.png")) == SECRET


def test_too_many_redirects(server, reader):
    with pytest.raises(StorageError, match="more than 5 redirects"):
        reader.get(url(server, "/img/loop.png"))
    assert server.hits[("GET", "/img/loop.png")] == 6


def test_http_only_where_a_prefix_names_it(server):
    https_only = _reader([f"https://127.0.0.1:{server.port}/img/"])
    with pytest.raises(ForbiddenURI, match="scheme 'http' not allowed"):
        https_only.get(url(server, "/img/a.png"))
    for other in (url(server, "/imgX/a.png"), url(server, "/a.png"),
                  f"http://127.0.0.1:{server.port + 1}/img/a.png",
                  url(server, "/img/../private/secret.png"), url(server, "/img/%2e%2e/private/secret.png"),
                  f"http://user:pw@127.0.0.1:{server.port}/img/a.png", url(server, "/img/a.png?x=1")):
        with pytest.raises(ForbiddenURI):
            _reader([f"http://127.0.0.1:{server.port}/img/"]).get(other)
    assert sum(server.hits.values()) == 0
    allowed = ["https://cdn.example.com/img/", f"http://127.0.0.1:{server.port}/img/"]
    loc = check_uri("HTTPS://CDN.example.com:443/img/a%20b.png", allowed)
    assert loc.uri == "https://cdn.example.com/img/a%20b.png"
    with pytest.raises(ForbiddenURI):
        check_uri("https://cdn.example.com:8443/img/a.png", allowed)


def test_name_resolving_to_loopback_is_refused(server):
    """``localhost`` names the same server as 127.0.0.1, but a host *name* must resolve to public
    addresses; only a prefix naming the IP literally reaches loopback."""
    by_name = _reader([f"http://localhost:{server.port}/img/"])
    with pytest.raises(ForbiddenURI, match="resolves to the loopback address"):
        by_name.get(url(server, "/img/a.png", host="localhost"))
    assert sum(server.hits.values()) == 0
    # a redirect from the IP prefix to the name prefix is refused on the same ground
    both = _reader([f"http://127.0.0.1:{server.port}/img/", f"http://localhost:{server.port}/img/"])
    with pytest.raises(ForbiddenURI, match="loopback"):
        both.get(url(server, "/img/redirect-host.png"))
    assert server.hits[("GET", "/img/a.png")] == 0
    control = _reader([f"http://127.0.0.1:{server.port}/img/"])
    assert control.get(url(server, "/img/a.png")) == PHOTO


def test_dns_answer_is_checked_once_and_connected_to(server, monkeypatch):
    """A CDN name is resolved once; a private answer is refused; a public answer is what the socket
    connects to (no second lookup that could answer 127.0.0.1)."""
    answers = {"private.cdn.test": "10.1.2.3", "rebind.cdn.test": "1.1.1.1",
               "meta.cdn.test": "169.254.169.254"}
    lookups, connects = [], []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        lookups.append(host)
        # a rebinding DNS: the real answer first, loopback to any later lookup
        ip = answers[host] if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    def fake_connect(address, timeout=None):
        connects.append(address[0])
        return socket.create_connection(("127.0.0.1", address[1]), timeout=timeout)  # the test's server

    monkeypatch.setattr(https_backend, "_getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(https_backend, "_create_connection", fake_connect)
    for host, kind in (("private.cdn.test", "private"), ("meta.cdn.test", "link-local")):
        lookups.clear()
        with pytest.raises(ForbiddenURI, match=f"resolves to the {kind} address"):
            _reader([f"http://{host}:{server.port}/img/"]).get(url(server, "/img/a.png", host=host))
    assert connects == []
    lookups.clear()
    rebind = _reader([f"http://rebind.cdn.test:{server.port}/img/"])
    assert rebind.get(url(server, "/img/a.png", host="rebind.cdn.test")) == PHOTO
    assert lookups == ["rebind.cdn.test"] and connects == ["1.1.1.1"]
    assert server.hosts[-1] == f"rebind.cdn.test:{server.port}"


def test_special_addresses():
    special = https_backend.special_address
    for ip in ("127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "fe80::1",
               "0.0.0.0", "::", "224.0.0.1", "ff02::1", "240.0.0.1", "100.64.0.1", "::ffff:127.0.0.1",
               "fd00::1"):
        assert special(ipaddress.ip_address(ip)), ip
    for ip in ("1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"):
        assert special(ipaddress.ip_address(ip)) is None, ip


# --- TLS ------------------------------------------------------------------------------------------------


def _self_signed(tmp_path, names: list[str], ips: list[str]):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "styletag test")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    cert, key = _self_signed(tmp_path, ["localhost"], ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = Server(tls=ctx)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, cert
    srv.shutdown()
    srv.server_close()


def _tls_reader(prefix: str, cafile=None) -> ImageReader:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    backend = HttpBackend([prefix], connect_timeout=2, read_timeout=2, ssl_context=ctx)
    return ImageReader([prefix], MAX, backends={"https": backend})


def test_https_with_a_trusted_certificate(tls_server):
    srv, cert = tls_server
    prefix = f"https://127.0.0.1:{srv.port}/img/"
    reader = _tls_reader(prefix, cert)
    assert reader.fetch(prefix + "a.png") == Fetched(PHOTO, "photo-v1")
    assert reader.head(prefix + "a.png") == ObjectInfo(len(PHOTO), "photo-v1")


def test_https_certificate_is_verified(tls_server, monkeypatch):
    srv, cert = tls_server
    prefix = f"https://127.0.0.1:{srv.port}/img/"
    with pytest.raises(StorageError, match="not trusted") as info:  # the system's CAs do not know it
        _tls_reader(prefix).get(prefix + "a.png")
    assert not isinstance(info.value, TransientStorageError)
    # Trusted, but not for this name: cdn.test (a public answer, connected to our server) is not in it.
    monkeypatch.setattr(https_backend, "_getaddrinfo", lambda host, port, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.1.1.1", port))])
    monkeypatch.setattr(https_backend, "_create_connection", lambda address, timeout=None:
                        socket.create_connection(("127.0.0.1", address[1]), timeout=timeout))
    named = f"https://cdn.test:{srv.port}/img/"
    with pytest.raises(StorageError, match="not trusted.*(Hostname mismatch|doesn't match|not valid)"):
        _tls_reader(named, cert).get(named + "a.png")
    assert srv.hits[("GET", "/img/a.png")] == 0
