"""All configuration, read from the environment in one place.

S3 endpoint and credentials are deliberately *not* here: boto3 reads its own variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so operators configure styletag exactly like
any other AWS tool and no secret passes through our code.
"""

from __future__ import annotations

import os
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


def _prefixes(raw: str | None, store_url: str) -> tuple[str, ...]:
    if raw:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return (store_url.rstrip("/") + "/",)


@dataclass(frozen=True)
class Settings:
    home: Path = DEFAULT_HOME
    database_url: str = ""
    broker_url: str = "redis://localhost:6379/0"
    store_url: str = ""
    model_path: str = ""
    allowed_image_prefixes: tuple[str, ...] = field(default_factory=tuple)
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    batch_size: int = 256
    fetch_threads: int = 16
    decode_threads: int = 2
    nightly_cron: str = "0 2 * * *"
    metrics_port: int = 0

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("STYLETAG_HOME", str(DEFAULT_HOME)))
        database_url = os.environ.get("STYLETAG_DATABASE_URL") or f"sqlite:///{home / 'catalog.db'}"
        store_url = os.environ.get("STYLETAG_STORE_URL") or (home / "images").resolve().as_uri()
        return cls(
            home=home,
            database_url=database_url,
            broker_url=os.environ.get("STYLETAG_BROKER_URL") or "redis://localhost:6379/0",
            store_url=store_url,
            model_path=os.environ.get("STYLETAG_MODEL", ""),
            allowed_image_prefixes=_prefixes(os.environ.get("STYLETAG_ALLOWED_IMAGE_PREFIXES"), store_url),
            max_image_bytes=_int("STYLETAG_MAX_IMAGE_BYTES", 20 * 1024 * 1024),
            max_image_pixels=_int("STYLETAG_MAX_IMAGE_PIXELS", 40_000_000),
            batch_size=_int("STYLETAG_BATCH_SIZE", 256),
            fetch_threads=_int("STYLETAG_FETCH_THREADS", 16),
            decode_threads=_int("STYLETAG_DECODE_THREADS", 2),
            nightly_cron=os.environ.get("STYLETAG_NIGHTLY_CRON", "0 2 * * *"),
            metrics_port=_int("STYLETAG_METRICS_PORT", 0),
        )


def redact_url(url: str) -> str:
    """Hide the password of a URL before it reaches a log line or an error message."""
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
