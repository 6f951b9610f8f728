"""All configuration, read from the environment in one place.

S3 endpoint and credentials are deliberately *not* here: boto3 reads its own variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so operators configure styletag exactly like
any other AWS tool and no secret passes through our code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from catalog.errors import ConfigError

DEFAULT_HOME = Path(".styletag")


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _nonnegative(name: str, default: int) -> int:
    value = _int(name, default)
    if value < 0:
        raise ConfigError(f"{name} must be 0 or more, got {value}")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """A yes/no setting: 1/true/yes/on or 0/false/no/off (empty: the default)."""
    raw = (os.environ.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


_MASTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_broker(broker_url: str, master_name: str) -> None:
    """A ``sentinel://`` broker URL (``sentinel://:pw@h1:26379;sentinel://:pw@h2:26379``, every part a
    Sentinel) needs the name of the master the Sentinels monitor; errors never show a password."""
    if master_name and not _MASTER_NAME.fullmatch(master_name):
        raise ConfigError(f"STYLETAG_BROKER_MASTER_NAME must be letters, digits, '.', '_', ':' or '-', "
                          f"got {master_name[:40]!r}")
    if not broker_url.startswith("sentinel://"):
        return
    from urllib.parse import urlsplit

    for part in broker_url.split(";"):
        try:
            parts = urlsplit(part.strip())
            ok = parts.scheme == "sentinel" and bool(parts.hostname) and (parts.port or 26379) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"STYLETAG_BROKER_URL: every ';'-separated part of a Sentinel URL must be "
                              f"sentinel://[:password@]host:port, got {redact_url(part.strip())!r}")
    if not master_name:
        raise ConfigError("STYLETAG_BROKER_URL is a sentinel:// URL: set STYLETAG_BROKER_MASTER_NAME to the name "
                          "of the Redis master the Sentinels monitor")


def _prefixes(raw: str | None, store_url: str) -> tuple[str, ...]:
    if raw:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return (store_url.rstrip("/") + "/",)


@dataclass(frozen=True)
class Settings:
    home: Path = DEFAULT_HOME
    database_url: str = ""
    broker_url: str = "redis://localhost:6379/0"
    # Sentinel only (a sentinel:// broker URL): the monitored master's name, and the Sentinels' own
    # password when they require one (the password in the URL is the Redis master's).
    broker_master_name: str = ""
    broker_sentinel_password: str = field(default="", repr=False)
    store_url: str = ""
    model_path: str = ""
    allowed_image_prefixes: tuple[str, ...] = field(default_factory=tuple)
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    batch_size: int = 256
    fetch_threads: int = 16
    decode_threads: int = 0  # images decoded at once per worker process; 0: the number of cores
    nightly_cron: str = "0 2 * * *"
    metrics_port: int = 0
    # PostgreSQL behind a PgBouncer older than 1.21 (transaction pooling without
    # max_prepared_statements): psycopg must never prepare statements on the server.
    db_pgbouncer: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("STYLETAG_HOME", str(DEFAULT_HOME)))
        database_url = os.environ.get("STYLETAG_DATABASE_URL") or f"sqlite:///{home / 'catalog.db'}"
        store_url = os.environ.get("STYLETAG_STORE_URL") or (home / "images").resolve().as_uri()
        broker_url = os.environ.get("STYLETAG_BROKER_URL") or "redis://localhost:6379/0"
        master_name = (os.environ.get("STYLETAG_BROKER_MASTER_NAME") or "").strip()
        check_broker(broker_url, master_name)
        return cls(
            home=home,
            database_url=database_url,
            broker_url=broker_url,
            broker_master_name=master_name,
            broker_sentinel_password=os.environ.get("STYLETAG_BROKER_SENTINEL_PASSWORD", ""),
            store_url=store_url,
            model_path=os.environ.get("STYLETAG_MODEL", ""),
            allowed_image_prefixes=_prefixes(os.environ.get("STYLETAG_ALLOWED_IMAGE_PREFIXES"), store_url),
            max_image_bytes=_int("STYLETAG_MAX_IMAGE_BYTES", 20 * 1024 * 1024),
            max_image_pixels=_int("STYLETAG_MAX_IMAGE_PIXELS", 40_000_000),
            batch_size=_int("STYLETAG_BATCH_SIZE", 256),
            fetch_threads=_int("STYLETAG_FETCH_THREADS", 16),
            decode_threads=_nonnegative("STYLETAG_DECODE_THREADS", 0),
            nightly_cron=os.environ.get("STYLETAG_NIGHTLY_CRON", "0 2 * * *"),
            metrics_port=_int("STYLETAG_METRICS_PORT", 0),
            db_pgbouncer=env_flag("STYLETAG_DB_PGBOUNCER"),
        )


def redact_url(url: str) -> str:
    """Hide the password of a URL before it reaches a log line or an error message. A list of URLs
    separated by ``;`` (kombu's fail-over and Sentinel form) has every password hidden."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
