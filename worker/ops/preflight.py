"""Configuration checks before work starts: ``styletag worker`` (in the launcher, before any Celery process
starts) and ``styletag retag`` (before a run is created) call :func:`check_image_access`.

Why: a worker whose ``STYLETAG_ALLOWED_IMAGE_PREFIXES`` (by default ``STYLETAG_STORE_URL`` + ``/``) does not
cover the catalog's images refuses every product as ``forbidden``; a retag then "finished" with 0 tagged
and every product failed, at thousands of images per second, and exited 0 (issue 15, item 6). A
configuration error is one line naming the setting, before anything is queued or written.

What is a configuration error and what is not: the catalog's images lying outside the allowed prefixes,
or none of a few of them readable (no such folder, no such bucket, access denied, missing objects) is;
a database or store that does not answer right now is not (a warning; the workers retry, and
``retag`` meets the same outage a moment later with its own error).
"""

from __future__ import annotations

import logging

from catalog.errors import ConfigError, ForbiddenURI, ServiceUnavailable, StorageError, failure_reason
from catalog.settings import Settings

log = logging.getLogger("styletag.preflight")

SAMPLE = 10  # products from each end of the catalog (by id)
PROBES = 3  # images read; one readable is enough


def _prefixes(settings: Settings) -> str:
    return ", ".join(settings.allowed_image_prefixes)[:300]


def check_image_access(settings: Settings) -> list[str]:
    """Raise :class:`ConfigError` when the workers could read none of the catalog's images with these
    settings; return warnings for what could not be checked now (an outage, not a setting)."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    from catalog.db import session_scope
    from catalog.queries import sample_image_uris
    from catalog.storage import ImageReader, check_uri

    reader = ImageReader.from_settings(settings)  # ConfigError for missing or malformed prefixes
    try:
        with session_scope(settings.database_url) as session:
            uris = sample_image_uris(session, SAMPLE, settings.allowed_image_prefixes)
    except (OperationalError, InterfaceError, ServiceUnavailable) as exc:
        return [f"catalog not checked (database unavailable: {str(exc).splitlines()[0][:120]})"]
    if not uris:
        return []
    allowed, refused = [], []
    for uri in uris:
        try:
            check_uri(uri, settings.allowed_image_prefixes)
            allowed.append(uri)
        except ForbiddenURI as exc:
            refused.append((uri, exc))
    if not allowed:
        uri = refused[0][0]
        raise ConfigError(
            f"none of {len(uris)} sampled catalog images (e.g. {uri[:120]!r}) is under STYLETAG_ALLOWED_IMAGE_PREFIXES "
            f"({_prefixes(settings)}); set it (by default STYLETAG_STORE_URL + '/') to the folders or buckets "
            "that hold the catalog's images")
    # The per-prefix matches come last in the sample: probe them first, then the oldest and newest.
    failures = []
    for uri in list(dict.fromkeys([*allowed[::-1][:PROBES - 1], allowed[0]]))[:PROBES]:
        try:
            reader.head(uri)
            return []
        except ServiceUnavailable as exc:  # TransientStorageError too: the store is away, not misconfigured
            return [f"images not checked (store unavailable: {str(exc)[:160]})"]
        except StorageError as exc:
            failures.append((uri, exc))
    uri, exc = failures[0]
    raise ConfigError(
        f"none of {len(failures)} sampled catalog images could be read ({failure_reason(exc)}: {str(exc)[:160]}); "
        f"check STYLETAG_STORE_URL and STYLETAG_ALLOWED_IMAGE_PREFIXES ({_prefixes(settings)}) and the store's "
        "credentials")


def preflight(settings: Settings) -> None:
    """:func:`check_image_access`, its warnings logged."""
    for warning in check_image_access(settings):
        log.warning("%s", warning)
