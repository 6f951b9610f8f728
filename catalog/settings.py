"""All configuration, read from the environment in this one module (nothing else in catalog/, model/ or
worker/ touches ``os.environ``).

:class:`Settings` is the typed settings object: one field per ``STYLETAG_*`` variable (the README table
lists them all; ``tests/test_settings_documented.py`` keeps the two in step). Secrets are :class:`Secret`
values, which never show in a repr, a log line or an error message.

S3 endpoint and credentials are deliberately *not* settings: boto3 reads its own variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so operators configure styletag exactly like any other
AWS tool and no secret passes through our code (:func:`aws_endpoint` only tells the S3 backend when its
client must be rebuilt).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

from catalog.errors import ConfigError

DEFAULT_HOME = Path(".styletag")
LOG_JSON_ENV = "STYLETAG_LOG_JSON"


class Secret:
    """A secret setting: ``str(s)`` and ``repr(s)`` are ``***``; ``s.get()`` is the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str = ""):
        self._value = value or ""

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value


def _int(name: str, default: int, minimum: int | None = None) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be {minimum} or more, got {value}")
    return value


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw[:40]!r}") from None
    if not value >= minimum:  # also refuses nan
        raise ConfigError(f"{name} must be a number of at least {minimum}, got {raw[:40]!r}")
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
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {raw[:40]!r}")


_MASTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_broker(broker_url: str, master_name: str) -> None:
    """A ``sentinel://`` broker URL (``sentinel://:pw@h1:26379;sentinel://:pw@h2:26379``, every part a
    Sentinel) needs the name of the master the Sentinels monitor; errors never show a password."""
    if master_name and not _MASTER_NAME.fullmatch(master_name):
        raise ConfigError(f"STYLETAG_BROKER_MASTER_NAME must be letters, digits, '.', '_', ':' or '-', "
                          f"got {master_name[:40]!r}")
    if not broker_url.startswith("sentinel://"):
        return
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


def _schema(raw: str | None) -> str:
    name = (raw or "public").strip()
    if not _SCHEMA_NAME.fullmatch(name):
        raise ConfigError(f"STYLETAG_DB_SCHEMA must be a lower-case SQL identifier (letters, digits, '_'), "
                          f"got {name[:40]!r}")
    return name


@dataclass(frozen=True)
class Settings:
    """One field per ``STYLETAG_*`` variable; ``ENV`` maps each field to its variable."""

    home: Path = DEFAULT_HOME
    # catalog
    database_url: str = ""
    db_pgbouncer: bool = False  # no server-side prepared statements (PgBouncer < 1.21, transaction pooling)
    db_schema: str = "public"  # PostgreSQL schema of styletag's tables, view and grants (beside the shop's own)
    # broker
    broker_url: str = "redis://localhost:6379/0"
    broker_master_name: str = ""  # Sentinel only: the monitored master's name
    broker_sentinel_password: Secret = field(default_factory=Secret)  # Sentinel only: the Sentinels' own
    broker_max_retries: int = 100
    # images
    store_url: str = ""
    allowed_image_prefixes: tuple[str, ...] = field(default_factory=tuple)
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    s3_max_attempts: int = 5
    http_connect_timeout: float = 5.0
    http_read_timeout: float = 30.0
    # model and pipeline
    model_path: str = ""
    batch_size: int = 256
    fetch_threads: int = 16
    decode_threads: int = 0  # images decoded at once per worker process; 0: the number of cores
    # decoder processes per worker process (worker/decode_pool.py); -1: for a photo model the host's cores
    # divided by host_procs, none (decode on the fetch threads) for a 28 px one; 0: never
    decode_procs: int = -1
    torch_threads: int = 0  # CPU inference threads per process; 0: torch's default
    # queues
    upload_batch: int = 128
    upload_interval: float = 0.25
    task_soft_time_limit: int = 900
    visibility_timeout: int = 3600
    max_ids_per_task: int = 10_000
    nightly_cron: str = "0 2 * * *"
    # this process (set by 'styletag worker' for each worker it starts)
    device: str = ""
    gpu: str = "none"
    queue: str = "inline"
    host_procs: int = 1  # worker processes styletag started on this host: they share its cores for decoding
    # operations
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"  # noqa: S104 - a container's port; compose publishes it on loopback
    log_json: bool = False

    @property
    def task_time_limit(self) -> int:
        return self.task_soft_time_limit + 60

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(_raw("STYLETAG_HOME") or str(DEFAULT_HOME))
        database_url = _raw("STYLETAG_DATABASE_URL") or f"sqlite:///{home / 'catalog.db'}"
        store_url = _raw("STYLETAG_STORE_URL") or (home / "images").resolve().as_uri()
        broker_url = _raw("STYLETAG_BROKER_URL") or "redis://localhost:6379/0"
        master_name = (_raw("STYLETAG_BROKER_MASTER_NAME") or "").strip()
        check_broker(broker_url, master_name)
        soft = _int("STYLETAG_TASK_SOFT_TIME_LIMIT", 900, minimum=1)
        return cls(
            home=home,
            database_url=database_url,
            db_pgbouncer=env_flag("STYLETAG_DB_PGBOUNCER"),
            db_schema=_schema(_raw("STYLETAG_DB_SCHEMA")),
            broker_url=broker_url,
            broker_master_name=master_name,
            broker_sentinel_password=Secret(os.environ.get("STYLETAG_BROKER_SENTINEL_PASSWORD", "")),
            broker_max_retries=_int("STYLETAG_BROKER_MAX_RETRIES", 100, minimum=0),
            store_url=store_url,
            allowed_image_prefixes=_prefixes(_raw("STYLETAG_ALLOWED_IMAGE_PREFIXES"), store_url),
            max_image_bytes=_int("STYLETAG_MAX_IMAGE_BYTES", 20 * 1024 * 1024, minimum=1),
            max_image_pixels=_int("STYLETAG_MAX_IMAGE_PIXELS", 40_000_000, minimum=1),
            s3_max_attempts=_int("STYLETAG_S3_MAX_ATTEMPTS", 5, minimum=1),
            http_connect_timeout=_float("STYLETAG_HTTP_CONNECT_TIMEOUT", 5.0, minimum=0.001),
            http_read_timeout=_float("STYLETAG_HTTP_READ_TIMEOUT", 30.0, minimum=0.001),
            model_path=_raw("STYLETAG_MODEL") or "",
            batch_size=_int("STYLETAG_BATCH_SIZE", 256, minimum=1),
            fetch_threads=_int("STYLETAG_FETCH_THREADS", 16, minimum=1),
            decode_threads=_int("STYLETAG_DECODE_THREADS", 0, minimum=0),
            decode_procs=_int("STYLETAG_DECODE_PROCS", -1, minimum=-1),
            torch_threads=_int("STYLETAG_TORCH_THREADS", 0, minimum=0),
            upload_batch=_int("STYLETAG_UPLOAD_BATCH", 128, minimum=1),
            upload_interval=_float("STYLETAG_UPLOAD_INTERVAL", 0.25),
            task_soft_time_limit=soft,
            visibility_timeout=_int("STYLETAG_VISIBILITY_TIMEOUT", max(3600, (soft + 60) * 2), minimum=1),
            max_ids_per_task=_int("STYLETAG_MAX_IDS_PER_TASK", 10_000, minimum=1),
            nightly_cron=_raw("STYLETAG_NIGHTLY_CRON") or "0 2 * * *",
            device=(_raw("STYLETAG_DEVICE") or "").strip(),
            gpu=(_raw("STYLETAG_GPU") or "none").strip(),
            queue=(_raw("STYLETAG_QUEUE") or "inline").strip(),
            host_procs=_int("STYLETAG_HOST_PROCS", 1, minimum=1),
            metrics_port=_int("STYLETAG_METRICS_PORT", 0, minimum=0),
            metrics_addr=_raw("STYLETAG_METRICS_ADDR") or "0.0.0.0",  # noqa: S104 - see the field
            log_json=env_flag(LOG_JSON_ENV),
        )


# Each field's variable. Every name here is in the README's table, and every STYLETAG_* name the README,
# docs/, .env.example and docker-compose.yml mention is here or in DEPLOYMENT_VARIABLES.
ENV: dict[str, str] = {f.name: f"STYLETAG_{f.name.upper()}" for f in fields(Settings)}
ENV["model_path"] = "STYLETAG_MODEL"
# docker compose's own variables (interpolated in docker-compose.yml, never read by styletag's code).
DEPLOYMENT_VARIABLES = ("STYLETAG_IMAGE", "STYLETAG_PUBLISH_ADDR", "STYLETAG_MODELS_DIR", "STYLETAG_BUCKET")


def redact_url(url: str) -> str:
    """Hide the password of a URL before it reaches a log line or an error message. A list of URLs
    separated by ``;`` (kombu's fail-over and Sentinel form) has every password hidden."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    from urllib.parse import urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


# --- the rest of the environment, for the few places that must see it ---------------------------------

_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|_AUTH$|CREDENTIAL|PRIVATE_KEY", re.I)
_MIN_SECRET = 4  # shorter values would scrub ordinary words


def environment_secrets() -> list[str]:
    """Secret values anywhere in the environment (variables named like a secret, passwords inside URL
    settings), longest first: what the log scrubber masks, whatever a library puts in a message."""
    found: set[str] = set()
    for name, value in os.environ.items():
        if not value:
            continue
        if _SECRET_NAME.search(name):
            found.add(value)
            if ":" in value and name.upper().endswith("_AUTH"):  # user:password (FLOWER_BASIC_AUTH)
                found.add(value.split(":", 1)[1])
        if "://" in value and "@" in value:  # a URL setting with a password in it (or a ';' list of them)
            for part in value.split(";"):
                try:
                    password = urlsplit(part.strip()).password
                except ValueError:
                    password = None
                if password:
                    found.update((password, unquote(password)))
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset), else the machine's: what the
    worker's defaults share out (bulk processes, decoder processes, decoding threads)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment of a process styletag starts (the launcher's Celery workers): ours, plus
    ``overrides`` given by field name (``device="cuda"`` sets ``STYLETAG_DEVICE``) or by variable name."""
    env = dict(os.environ)
    for key, value in overrides.items():
        env[ENV.get(key, key)] = value
    return env


def process_identity() -> dict[str, str]:
    """The queue and GPU the launcher gave this worker process (the fields its log lines carry); cheap
    enough for every log record, and empty outside a worker."""
    return {key: value for key, value in (("queue", os.environ.get(ENV["queue"], "")),
                                          ("gpu", os.environ.get(ENV["gpu"], ""))) if value}


def export_log_json() -> None:
    """JSON log lines for this process and every process it starts (``styletag --log-json worker``)."""
    os.environ[LOG_JSON_ENV] = "1"


def aws_endpoint() -> tuple[str | None, str | None]:
    """boto3's endpoint override variables, read only to know when a cached S3 client is stale."""
    return os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3")
