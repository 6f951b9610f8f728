"""Redis Sentinel for the broker: a ``sentinel://`` STYLETAG_BROKER_URL with STYLETAG_BROKER_MASTER_NAME.

Settings validation and secret masking run anywhere. The rest starts a private password-protected
redis-server and a Sentinel (``redis-server --sentinel``, itself password-protected) that monitors it as
master ``styletag-test``, and checks that every way styletag reaches Redis goes through the Sentinel:
the broker connection's redis-py client (the nightly lock), the queue-depth exporter, and a Celery app
publishing a task. Skipped when redis-server is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import replace

import pytest

from catalog.errors import ConfigError
from catalog.settings import Settings, redact_url
from tests.conftest import free_port
from tests.support.redis_server import RedisServer

MASTER = "styletag-test"
REDIS_PW = "redis-pw-4c1d"
SENTINEL_PW = "sentinel-pw-9e2a"
DB = 5


def _env(monkeypatch, **values: str) -> None:
    for name in ("STYLETAG_BROKER_URL", "STYLETAG_BROKER_MASTER_NAME", "STYLETAG_BROKER_SENTINEL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


# --- settings, no server ----------------------------------------------------------------------------

def test_sentinel_url_needs_a_master_name(monkeypatch):
    url = f"sentinel://:{REDIS_PW}@h1:26379;sentinel://:{REDIS_PW}@h2:26379"
    _env(monkeypatch, STYLETAG_BROKER_URL=url)
    with pytest.raises(ConfigError, match="STYLETAG_BROKER_MASTER_NAME") as err:
        Settings.from_env()
    assert REDIS_PW not in str(err.value)

    _env(monkeypatch, STYLETAG_BROKER_URL=url, STYLETAG_BROKER_MASTER_NAME=" bad name")
    with pytest.raises(ConfigError, match="STYLETAG_BROKER_MASTER_NAME"):
        Settings.from_env()


def test_every_part_of_a_sentinel_url_must_be_a_sentinel(monkeypatch):
    _env(monkeypatch, STYLETAG_BROKER_URL=f"sentinel://:{REDIS_PW}@h1:26379;redis://:{REDIS_PW}@h2:6379",
         STYLETAG_BROKER_MASTER_NAME=MASTER)
    with pytest.raises(ConfigError, match="every ';'-separated part") as err:
        Settings.from_env()
    assert REDIS_PW not in str(err.value)


def test_sentinel_transport_options(monkeypatch):
    from worker.app import sentinel_options

    url = f"sentinel://:{REDIS_PW}@h1:26379/3;sentinel://:{REDIS_PW}@h2:26380/3"
    _env(monkeypatch, STYLETAG_BROKER_URL=url, STYLETAG_BROKER_MASTER_NAME=MASTER)
    settings = Settings.from_env()
    assert settings.broker_master_name == MASTER
    options = sentinel_options(settings)
    assert options["master_name"] == MASTER
    assert "password" not in options["sentinel_kwargs"]

    monkeypatch.setenv("STYLETAG_BROKER_SENTINEL_PASSWORD", SENTINEL_PW)
    settings = Settings.from_env()
    options = sentinel_options(settings)
    assert options["master_name"] == MASTER
    assert options["sentinel_kwargs"]["password"] == SENTINEL_PW
    assert SENTINEL_PW not in repr(settings)

    # A plain Redis URL gets no Sentinel option, even with a master name left in .env.
    _env(monkeypatch, STYLETAG_BROKER_URL="redis://127.0.0.1:6379/0", STYLETAG_BROKER_MASTER_NAME=MASTER)
    assert sentinel_options(Settings.from_env()) == {}


def test_every_password_of_a_sentinel_url_is_masked(monkeypatch):
    from worker.ops.logs import _secrets, scrub

    url = "sentinel://:first-pw@h1:26379;sentinel://:second-pw@h2:26379"
    masked = redact_url(url)
    assert "first-pw" not in masked and "second-pw" not in masked
    assert masked == "sentinel://:***@h1:26379;sentinel://:***@h2:26379"

    _env(monkeypatch, STYLETAG_BROKER_URL=url, STYLETAG_BROKER_MASTER_NAME=MASTER,
         STYLETAG_BROKER_SENTINEL_PASSWORD=SENTINEL_PW)
    secrets = _secrets()
    assert {"first-pw", "second-pw", SENTINEL_PW} <= set(secrets)
    line = scrub(f"connect failed: second-pw {SENTINEL_PW}")
    assert "second-pw" not in line and SENTINEL_PW not in line


# --- a real Sentinel ----------------------------------------------------------------------------------

def _start(argv: list[str], log_path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _wait(check, proc: subprocess.Popen, what: str, log_path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - not up yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    """A private Redis master and one Sentinel monitoring it; yields (sentinel URL, master client)."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (needed for a real Sentinel)")
    folder = tmp_path_factory.mktemp("sentinel")
    master = RedisServer(folder, password=REDIS_PW, db=DB).start()
    rport, sport, dead = master.port, free_port(), free_port()
    procs = []
    client = master.client()
    try:
        conf = folder / "sentinel.conf"  # Sentinel rewrites its own configuration file: it must be writable
        conf.write_text(
            f"port {sport}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {rport} 1\n"
            f"sentinel auth-pass {MASTER} {REDIS_PW}\n"
            f"requirepass {SENTINEL_PW}\n"
        )
        sent = _start([exe, str(conf), "--sentinel"], folder / "sentinel.log")
        procs.append(sent)
        probe = redis.Redis(host="127.0.0.1", port=sport, password=SENTINEL_PW)
        _wait(lambda: probe.sentinel_master(MASTER)["is_master"] and not probe.sentinel_master(MASTER)["is_sdown"],
              sent, "redis-server --sentinel", folder / "sentinel.log")
        probe.close()
        # The first Sentinel listed is down: clients must go on to the next one.
        url = f"sentinel://:{REDIS_PW}@127.0.0.1:{dead}/{DB};sentinel://:{REDIS_PW}@127.0.0.1:{sport}/{DB}"
        client.flushdb()
        yield url, client
    finally:
        client.close()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        master.stop()


@pytest.fixture
def sentinel_settings(sentinel, monkeypatch):
    url, client = sentinel
    client.flushdb()
    _env(monkeypatch, STYLETAG_BROKER_URL=url, STYLETAG_BROKER_MASTER_NAME=MASTER,
         STYLETAG_BROKER_SENTINEL_PASSWORD=SENTINEL_PW)
    yield Settings.from_env(), client
    client.flushdb()


@pytest.mark.slow
def test_broker_connection_reaches_the_master_through_sentinel(sentinel_settings):
    from worker.app import broker_connection
    from worker.producers.nightly import LOCK_KEY, broker_redis

    settings, master = sentinel_settings
    with broker_connection(settings) as conn:
        client = broker_redis(conn)  # what the nightly lock uses
        lock = client.lock(LOCK_KEY, timeout=30, blocking=False)
        assert lock.acquire(blocking=False)
        try:
            assert master.exists(LOCK_KEY) == 1  # the lock is on the master, in the URL's database
        finally:
            lock.release()
    assert master.exists(LOCK_KEY) == 0


@pytest.mark.slow
def test_sentinel_needs_its_own_password(sentinel_settings):
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from worker.app import broker_connection

    settings, _ = sentinel_settings
    settings = replace(settings, broker_sentinel_password="")
    with pytest.raises((OperationalError, RedisError)) as err, \
            broker_connection(settings, transport_options={"max_retries": 1}) as conn:
        conn.default_channel.client.ping()
    assert REDIS_PW not in str(err.value)


@pytest.mark.slow
def test_celery_publishes_through_sentinel_and_the_exporter_counts_it(sentinel_settings):
    from worker.app import BULK_QUEUE, make_app
    from worker.ops.metrics import queue_depths

    settings, master = sentinel_settings
    app = make_app(settings)
    try:
        assert app.conf.broker_transport_options["master_name"] == MASTER
        app.send_task("styletag.tag_products", args=(7, [1, 2, 3]), queue=BULK_QUEUE)
    finally:
        app.close()
    raw = master.lrange(BULK_QUEUE, 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "styletag.tag_products"

    depths, unacked = queue_depths(settings)
    assert depths[BULK_QUEUE] == 1
    assert unacked == 0
