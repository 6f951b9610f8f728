"""Logging set-up: plain or JSON lines, and a scrubber that keeps secrets out of every record.

JSON lines (``styletag --log-json ...`` or ``STYLETAG_LOG_JSON=1``) put one object per line on stderr:
``ts``, ``level``, ``logger``, ``msg`` and, where known, ``run_id``, ``task_id``, ``task``,
``batch_size``, ``tagged``, ``failed``, ``review``, ``skipped``, ``stale``, ``model_version``, ``redelivered``,
``retries``, ``seconds`` and
``stages`` (seconds per pipeline stage), plus the worker's ``queue`` and ``gpu``. ``--log-json`` also
sets ``STYLETAG_LOG_JSON=1`` so that the Celery processes the launcher starts log JSON too; inside
them Celery configures logging and :func:`setup_celery_logger` (connected in ``worker/tasks.py``)
swaps in the JSON formatter.

Secrets: values of environment variables named like a secret (``*PASSWORD*``, ``*SECRET*``,
``*TOKEN*``, ``*_AUTH``), passwords inside URLs (``scheme://user:pw@``) and ``password=...`` pairs are
replaced by ``***`` in the message, the traceback and every extra field, whatever a library wrote.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time

from catalog.errors import ConfigError
from catalog.settings import LOG_JSON_ENV, env_flag, environment_secrets, export_log_json, process_identity

# Extra fields a record may carry (``log.info(..., extra={...})``) that JSON lines keep as fields.
FIELDS = ("run_id", "task_id", "task", "batch_size", "tagged", "failed", "review", "skipped", "stale", "model_version",
          "redelivered", "retries", "seconds", "stages")

# Anchored on the literal "://" (whatever scheme precedes it): the former ``[a-z][a-z0-9+.-]*://`` made the
# engine rescan a long word from every position of it, and scrub() was quadratic (10.9 s for 32k
# characters, issue 15 item 3); a literal prefix is found by a fast scan, and each match starts there.
_URL_PASSWORD = re.compile(r"://(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|passwd|pwd|secret|token)\s*[=:]\s*)(?P<pw>[^\s&;,'\"]+)", re.I)

# What a log line or an echoed error may hold at most: a message, each extra field, a traceback. Cut
# after scrubbing, never before (a secret cut in half would no longer be recognised).
MAX_MESSAGE_CHARS = 2000
MAX_FIELD_CHARS = 500
MAX_TRACEBACK_CHARS = 20000


def json_enabled() -> bool:
    try:
        return env_flag(LOG_JSON_ENV)
    except ConfigError:
        return False


def _secrets() -> list[str]:
    return environment_secrets()


@functools.lru_cache(maxsize=16)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern | None:
    """One alternation of every secret, longest first: one pass over a text, whatever their number."""
    return re.compile("|".join(map(re.escape, sorted(secrets, key=len, reverse=True)))) if secrets else None


def scrub(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with URL passwords, ``password=...`` values and secret environment values masked.
    Linear in ``len(text)``: three single passes."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"://{m['user']}:***@", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['key']}***", text)
    pattern = _secrets_pattern(tuple(_secrets() if secrets is None else secrets))
    return pattern.sub("***", text) if pattern is not None else text


def bound(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (scrub first: see MAX_MESSAGE_CHARS)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def shown(value, limit: int = 80) -> str:
    """A value from outside (a message's argument, a command-line argument) as an error message may
    repeat it: repr, secrets masked, at most ``limit`` characters."""
    return bound(scrub(repr(value)), limit)


def scrub_value(value, secrets: list[str] | None = None):
    """Scrub strings inside a JSON-ready value (dicts, lists, numbers pass through), each string bounded
    to MAX_FIELD_CHARS and each list or dict to its first 100 items."""
    secrets = _secrets() if secrets is None else secrets
    if isinstance(value, str):
        return bound(scrub(value, secrets))
    if isinstance(value, dict):
        return {bound(scrub(str(k), secrets)): scrub_value(v, secrets) for k, v in list(value.items())[:100]}
    if isinstance(value, list | tuple):
        return [scrub_value(v, secrets) for v in value[:100]]
    if value is None or isinstance(value, bool | int | float):
        return value
    return bound(scrub(str(value), secrets))


class ScrubFilter(logging.Filter):
    """Masks secrets in the message and in the traceback text before any formatter sees them, then bounds
    them (MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error report
            return True
        clean = bound(scrub(msg), MAX_MESSAGE_CHARS)
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = bound(scrub(logging.Formatter().formatException(record.exc_info)), MAX_TRACEBACK_CHARS)
        return True


def _current_task() -> tuple[str | None, str | None]:
    """(task id, task name) of the Celery task running in this thread, if any."""
    if "celery" not in sys.modules:
        return None, None
    try:
        from celery import current_task

        task = current_task._get_current_object() if current_task else None
        if task is None or task.request is None or task.request.id is None:
            return None, None
        return task.request.id, task.name
    except Exception:  # never let logging fail
        return None, None


class JsonFormatter(logging.Formatter):
    """One JSON object per record; every string in it scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        secrets = _secrets()
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": bound(scrub(record.getMessage(), secrets), MAX_MESSAGE_CHARS),
            "pid": record.process,
        }
        for key in FIELDS:
            if key in record.__dict__:
                out[key] = scrub_value(record.__dict__[key], secrets)
        if "task_id" not in out:
            task_id, task_name = _current_task()
            if task_id is not None:
                out["task_id"] = task_id
                out.setdefault("task", task_name)
        for key, value in process_identity().items():
            out[key] = value
        if record.exc_info or record.exc_text:
            text = record.exc_text or self.formatException(record.exc_info)
            out["exc"] = bound(scrub(text, secrets), MAX_TRACEBACK_CHARS)
        return json.dumps(out, default=str, ensure_ascii=False)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """The CLI's logging: one stderr handler, scrubbed, plain or JSON lines."""
    if json_lines:
        export_log_json()  # the Celery processes the launcher starts inherit it
    elif json_lines is None:
        json_lines = json_enabled()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if json_lines:
        logging.captureWarnings(True)  # a warnings.warn() becomes a JSON line, not a bare stderr line


def setup_early_logging() -> None:
    """In a Celery process before Celery configures logging (``celeryd_init``): with JSON lines on,
    route warnings (Celery's start-up SecurityWarning, deprecations) through a JSON handler, so that
    stderr holds nothing but JSON. Celery replaces this handler with its own a moment later."""
    if not json_enabled():
        return
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(ScrubFilter())
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    logging.captureWarnings(True)


def setup_celery_logger(logger: logging.Logger | None = None) -> None:
    """After Celery configured a logger (worker or beat): scrub its handlers, and switch them to JSON
    lines when ``STYLETAG_LOG_JSON`` is set. Idempotent."""
    loggers = [logger or logging.getLogger()]
    try:
        from billiard.util import get_logger as mp_logger

        loggers.append(mp_logger())
    except Exception:  # pragma: no cover - billiard always comes with Celery
        pass
    as_json = json_enabled()
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())
            if as_json and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
