"""A fault-injecting TCP proxy in front of an S3 endpoint (the moto server of tests/conftest.py): forward,
answer ``503 SlowDown``, or be down. Used by the chaos tests' ``faulty_s3`` fixture."""

from __future__ import annotations

import socket
import threading
from collections import Counter

from tests.conftest import free_port


class FaultyEndpoint:
    """A TCP proxy in front of the S3 server. Modes: ``forward``; ``error`` (every request is answered
    ``503 SlowDown``, as S3 does when throttling); ``down`` (the port is closed: connection refused).
    Switching mode drops every open connection, so pooled keep-alive connections see the change too."""

    SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = free_port()
        self.mode = "forward"
        self.served = Counter()  # connections per mode while it was on
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        lsock.settimeout(0.05)
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, args=(lsock,), daemon=True)
        self._thread.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = lsock.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                self._track(conn)
                self.served[self.mode] += 1
                target = self._serve_errors if self.mode == "error" else self._forward
                threading.Thread(target=target, args=(conn,), daemon=True).start()
        finally:
            lsock.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.add(s)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
            with self._lock:
                self._conns.discard(s)

    def _drop_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        self._close(*conns)

    def set_mode(self, mode: str) -> None:
        assert mode in ("forward", "error", "down")
        if mode == "down":
            self._stop.set()
            if self._thread is not None:
                self._thread.join(5)
        elif self.mode == "down":
            self._listen()
        self.mode = mode
        self._drop_all()

    def close(self) -> None:
        self.set_mode("down")

    def _forward(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._close(client)
            return
        up.settimeout(None)
        self._track(up)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(up, client), daemon=True)
        back.start()
        pump(client, up)
        back.join(5)
        self._close(client, up)

    def _serve_errors(self, conn: socket.socket) -> None:
        """Read one request (headers and body), answer 503 SlowDown, close."""
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            while len(rest) < length:
                data = conn.recv(65536)
                if not data:
                    return
                rest += data
            body = b"" if head.startswith(b"HEAD ") else self.SLOWDOWN
            conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            self._close(conn)
