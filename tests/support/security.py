"""What the hostile-input, least-privilege and secrets tests (tests/security) share besides fixtures: the
secrets and limits, the styletag CLI runner that records every output, the inotify watch and the TCP trap,
the hostile catalog's rows, and the checkpoints the model-file tests build. Fixtures: tests/security/conftest.py."""

from __future__ import annotations

import base64
import ctypes
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.security.corpus import corpus, exif_rotated_jpeg, padded_png

REDIS_DB = 13


MAX_IMAGE_BYTES = 200_000


DB_PASSWORD = "Sup3rSecretPw!"


BROKER_PASSWORD = "Br0kerPassw0rd-7f3a9c"


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYSecurityTest42"


SECRETS = (DB_PASSWORD, BROKER_PASSWORD, AWS_SECRET)


# Peak resident memory allowed to any process of the worker (Celery main and pool child, model loaded)
# over its whole life, the decompression bombs included. Decoding bomb.png would take 2.5 GB alone.
WORKER_PEAK_BOUND_KIB = 1024 * 1024


CAPTURED: list[tuple[str, str]] = []  # (command, stdout + stderr) of every styletag run in this package


def secret_forms() -> list[str]:
    """Each secret as it could leak: raw and percent-encoded."""
    out = set(SECRETS)
    out.update(quote(s, safe="") for s in SECRETS)
    return sorted(out)


def styletag(env: dict[str, str], *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run ``.venv/bin/styletag ARGS`` with ``env`` on top of ours; record its output for test_secrets."""
    exe = Path(sys.executable).with_name("styletag")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]
    t0 = time.monotonic()
    proc = subprocess.run([*argv, *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)
    print(f"styletag {' '.join(args)[:80]!r}: exit {proc.returncode} in {time.monotonic() - t0:.1f}s")
    CAPTURED.append((" ".join(args), proc.stdout + proc.stderr))
    return proc


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit non-zero, exactly one line on stderr, starting with ``error:``, no traceback anywhere."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@dataclass
class SecDB:
    name: str
    role: str
    admin_url: str  # the superuser, for test set-up and assertions
    url: str  # the role with a password: what every styletag process uses


@dataclass
class Sec:
    env: dict[str, str]
    db: SecDB
    broker_url: str
    root: Path  # tmp folder holding store/, outside/ and store-evil/
    store: Path
    outside: Path
    bucket: str

    @property
    def store_uri(self) -> str:
        return self.store.as_uri()

    def settings(self, **changes):
        """Settings as the worker sees them (but with the superuser's database URL), for in-process use."""
        from dataclasses import replace

        from catalog.settings import Settings

        values = {"database_url": self.db.admin_url, "broker_url": self.broker_url, "store_url": self.store_uri,
                  "allowed_image_prefixes": tuple(self.env["STYLETAG_ALLOWED_IMAGE_PREFIXES"].split(",")),
                  "max_image_bytes": MAX_IMAGE_BYTES, "batch_size": 64, "fetch_threads": 4}
        return replace(Settings.from_env(), **{**values, **changes})


IN_ACCESS, IN_OPEN = 0x1, 0x20


class FileWatch:
    """inotify (through libc) on folders: every open or read of a file in them, by any process."""

    def __init__(self, folders: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable (errno {ctypes.get_errno()})")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_ACCESS | IN_OPEN)
            assert wd >= 0, f"inotify_add_watch {folder}: errno {ctypes.get_errno()}"
            self.folders[wd] = folder

    def events(self) -> list[str]:
        """``'<path> open|access'`` for every event since the last call."""
        out, buf = [], b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            buf += chunk
        pos = 0
        while pos + 16 <= len(buf):
            wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
            name = buf[pos + 16 : pos + 16 + length].rstrip(b"\0").decode(errors="replace")
            pos += 16 + length
            what = "open" if mask & IN_OPEN else "access"
            out.append(f"{self.folders.get(wd, '?')}/{name} {what}")
        return out

    def close(self) -> None:
        os.close(self.fd)


class ConnectionTrap:
    """A loopback TCP listener that counts connections (any protocol: http, https, gopher, ftp)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            try:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n")
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


HOSTILE_SKUS = (
    "'; DROP TABLE products; --",
    "Robert'); DELETE FROM tag_state WHERE ('1'='1",
    "\U0001f457\U0001f525 summer dress \u2728",
    "\u0641\u0633\u062a\u0627\u0646 \u0623\u062d\u0645\u0631 \u202eRTL\u202c \u05e2\u05d1\u05e8\u05d9\u05ea",
    "sku%_\\*[a-z]",
)


@dataclass
class Row:
    sku: str
    uri: str
    expect: tuple[str, str | None]  # (status, reason)


@dataclass
class Tagged:
    rows: dict[str, Row]
    inline: subprocess.CompletedProcess
    inline_run: dict
    inline_states: dict[str, tuple]  # sku -> (status, reason, error, run_id)
    celery: subprocess.CompletedProcess
    celery_run: dict
    celery_states: dict[str, tuple]
    reads_outside: list[str]  # inotify events on files outside the allowed prefixes, during both runs
    trap: ConnectionTrap
    watch: FileWatch
    worker_pids_before: list[int]
    worker_pids_after: list[int]
    worker_peak_kib: dict[int, int] = field(default_factory=dict)  # VmHWM after the Celery retag
    worker_peak_before_kib: dict[int, int] = field(default_factory=dict)  # VmHWM before it (model loaded)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out.append(c)
            todo.append(c)
    return sorted(out)


def vm_hwm_kib(pid: int | str) -> int:
    """Peak resident set size of a process (``"self"``: this one), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def states(admin_url: str) -> dict[str, tuple]:
    from sqlalchemy import select

    from catalog.db import session_scope
    from catalog.schema import Product, TagState

    with session_scope(admin_url) as s:
        rows = s.execute(select(Product.sku, TagState.status, TagState.reason, TagState.error, TagState.run_id)
                         .join(TagState, TagState.product_id == Product.id)).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _build_rows(sec: Sec, trap_port: int, s3) -> list[Row]:
    store, store_uri = sec.store, sec.store_uri
    rows: list[Row] = []
    # 7. the image corpus, in the file store
    (store / "img").mkdir()
    for sample in corpus(MAX_IMAGE_BYTES):
        (store / "img" / sample.name).write_bytes(sample.data)
        expect = ("tagged", None) if sample.expect == "tagged" else ("failed", sample.expect)
        rows.append(Row(f"img/{sample.name}", f"{store_uri}/img/{sample.name}", expect))
    # 12. the S3 store (the worker signs with AWS_SECRET_ACCESS_KEY); 8. outside its allowed key prefix
    other = f"{sec.bucket}-other"
    s3.create_bucket(Bucket=other)
    for bucket, key, data in ((sec.bucket, "images/photo.png", _png(1)),
                              (sec.bucket, "images/exif_rotated.jpg", exif_rotated_jpeg()),
                              (sec.bucket, "images/over_limit.png", padded_png(MAX_IMAGE_BYTES + 1)),
                              (sec.bucket, "private/secret.png", _png(2)), (other, "images/photo.png", _png(3))):
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    b = sec.bucket
    rows += [
        Row("s3/photo.png", f"s3://{b}/images/photo.png", ("tagged", None)),
        Row("s3/exif_rotated.jpg", f"s3://{b}/images/exif_rotated.jpg", ("tagged", None)),
        Row("s3/over_limit.png", f"s3://{b}/images/over_limit.png", ("failed", "too_large")),
        Row("s3/missing", f"s3://{b}/images/missing.png", ("failed", "missing")),
        Row("s3/outside-key-prefix", f"s3://{b}/private/secret.png", ("failed", "forbidden")),
        Row("s3/dotdot", f"s3://{b}/images/../private/secret.png", ("failed", "forbidden")),
        Row("s3/dotdot-encoded", f"s3://{b}/images/%2e%2e/private/secret.png", ("failed", "forbidden")),
        Row("s3/other-bucket", f"s3://{other}/images/photo.png", ("failed", "forbidden")),
        Row("s3/userinfo", f"s3://{b}@{other}/images/photo.png", ("failed", "forbidden")),
    ]
    # 8. files outside the prefixes that would decode as images, and ways to reach them
    secret_png = _png(4)
    (sec.outside / "secret.png").write_bytes(secret_png)
    (sec.root / "store-evil" / "photo.png").write_bytes(secret_png)
    (store / "link.png").symlink_to(sec.outside / "secret.png")
    (store / "linkdir").symlink_to(sec.outside, target_is_directory=True)
    os.mkfifo(store / "fifo.png")
    outside_uri = (sec.outside / "secret.png").as_uri()
    forbidden = [
        ("etc-passwd", "file:///etc/passwd"),
        ("outside-absolute", outside_uri),
        ("dotdot", f"{store_uri}/../outside/secret.png"),
        ("dotdot-encoded", f"{store_uri}/%2e%2e/outside/secret.png"),
        ("dotdot-encoded-upper", f"{store_uri}/%2E%2E/outside/secret.png"),
        ("dotdot-double-encoded", f"{store_uri}/%252e%252e/outside/secret.png"),
        ("dotdot-encoded-slash", f"{store_uri}/..%2Foutside%2Fsecret.png"),
        ("dotdot-backslash", f"{store_uri}/..\\outside\\secret.png"),
        ("symlink-to-file-outside", f"{store_uri}/link.png"),
        ("symlink-to-dir-outside", f"{store_uri}/linkdir/secret.png"),
        ("prefix-sibling", (sec.root / "store-evil" / "photo.png").as_uri()),
        ("file-with-host", f"file://evil.example{sec.store}/img/one_pixel.png"),
        ("fifo-in-store", f"{store_uri}/fifo.png"),
        ("directory-in-store", f"{store_uri}/img"),
        ("cloud-metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("http-loopback", f"http://127.0.0.1:{trap_port}/image.png"),
        ("https-loopback", f"https://127.0.0.1:{trap_port}/image.png"),
        ("gopher-loopback", f"gopher://127.0.0.1:{trap_port}/_GET%20/image.png"),
        ("ftp-loopback", f"ftp://127.0.0.1:{trap_port}/image.png"),
        ("data-uri", "data:image/png;base64," + base64.b64encode(_png(5)).decode()),
        ("no-scheme", "img/one_pixel.png"),
        ("empty", ""),
        ("nul-byte", f"{store_uri}/img/one_pixel.png%00.txt"),
        ("query-string", f"{store_uri}/img/one_pixel.png?x=1"),
        ("header-injection", f"{store_uri}/img/one_pixel.png\r\nHost: evil.example"),
        ("long-2048", f"{store_uri}/" + "a" * (2047 - len(store_uri))),  # the column's maximum length
    ]
    rows += [Row(f"uri/{name}", uri, ("failed", "forbidden")) for name, uri in forbidden]
    # 8. SKUs with SQL metacharacters and unicode, each with a good image
    rows += [Row(sku, f"{store_uri}/img/one_pixel.png", ("tagged", None)) for sku in HOSTILE_SKUS]
    return rows


def catalog_taxonomy():
    """The taxonomy of the configured checkpoint: the one whose labels sec_db synced."""
    from catalog.settings import Settings
    from model.metadata import CheckpointMeta
    from worker.context import checkpoint_path

    return CheckpointMeta.read(checkpoint_path(Settings.from_env())).taxonomy


def tiny_checkpoint(path: Path, taxonomy) -> str:
    """A small untrained model over ``taxonomy``, saved in the real format; returns its model_version."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.net import build_model
    from model.train import TrainConfig, base_meta

    torch.manual_seed(0)
    model = build_model("resnet-tiny", len(taxonomy.coarse.labels), len(taxonomy.fine.labels), channels=1).eval()
    meta = base_meta(TrainConfig(backbone="resnet-tiny"), taxonomy)
    meta.update(trained_at="2030-01-01T00:00:00+00:00", command="tests/security", data={}, metrics={})
    return save_checkpoint(path, model, meta)
