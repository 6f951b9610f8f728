"""A private ``redis-server`` for one test or one module: a free loopback port, nothing kept on disk
(killing it loses every message), optionally password-protected. The one helper every test package
that needs a broker of its own uses (chaos, security, ops)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import _unavailable, free_port


class RedisServer:
    """``RedisServer(workdir, password=None).start()``; ``url``, ``client()``, ``kill()``, ``start()`` again
    on the same port (a restarted broker, empty)."""

    def __init__(self, workdir: Path, password: str | None = None, db: int = 0):
        if shutil.which("redis-server") is None:
            _unavailable("redis-server binary not installed")
        self.port = free_port()
        self.workdir = Path(workdir)
        self.password = password
        self.db = db
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{self.db}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.starts += 1
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        if self.password:
            argv += ["--requirepass", self.password]
        with open(self.workdir / f"redis-{self.port}-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, password=self.password, db=self.db, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while not self._ping(client):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                _unavailable(f"redis-server could not be started on port {self.port}")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, db=self.db)
