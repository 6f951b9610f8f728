"""Typed errors. Each one carries a single line that tells the user what went wrong and what to do.

The base class and the model's errors live in ``model.errors`` (one family); the CLI prints
``error: <message>`` and exits with ``exit_code``; nothing here ever shows a traceback.
"""

from __future__ import annotations

from model.errors import BadImage, DatasetMissing, StyletagError, TaxonomyError

__all__ = [
    "FAILURE_REASONS", "BadImage", "ConfigError", "DatasetMissing", "ForbiddenURI", "NotFound", "ObjectMissing",
    "ObjectTooLarge", "ServiceUnavailable", "StorageError", "StyletagError", "TaxonomyError", "TaxonomyMismatch",
    "TransientStorageError", "failure_reason",
]


class ConfigError(StyletagError):
    """A setting is missing or malformed (bad URL, unknown scheme, ...)."""


class ServiceUnavailable(StyletagError):
    """A service (database, broker, object store) cannot be reached; transient, worth retrying."""


class NotFound(StyletagError):
    """An unknown SKU, style, run or product."""

    exit_code = 2


class StorageError(StyletagError):
    """Base for object-storage failures."""


class ForbiddenURI(StorageError):
    """A URI outside the allowed prefixes, with ``..``, or with an unknown scheme. Never retried."""


class ObjectMissing(StorageError, NotFound):
    """The object does not exist. Never retried."""


class ObjectTooLarge(StorageError):
    """The object is larger than the configured maximum; refused before download. Never retried."""


class TransientStorageError(StorageError, ServiceUnavailable):
    """A storage error that may go away (timeouts, 5xx, throttling); retried with backoff."""


class TaxonomyMismatch(StyletagError):
    """The catalog already holds labels for this taxonomy name, and they differ from the taxonomy given."""


# Why a product failed, as stored in tag_state.reason, counted by the metrics and shown by the report:
# the one list. Storage errors first, then what decoding refuses (model.preprocess), then anything else.
FAILURE_REASONS: dict[str, str] = {
    "missing": "no object at the image URI",
    "forbidden": "image URI outside the allowed prefixes, or otherwise refused",
    "too_large": "object larger than STYLETAG_MAX_IMAGE_BYTES",
    "unreachable": "the store did not answer (after retries)",
    "storage": "the store refused the read",
    "empty": "the image is empty (0 bytes)",
    "not_an_image": "not a recognised image format",
    "truncated": "the image file is truncated",
    "corrupt": "the image file fails its checksum",
    "too_many_pixels": "more pixels than STYLETAG_MAX_IMAGE_PIXELS (decompression bomb)",
    "bad_image": "the image cannot be decoded",
    "error": "an unexpected error",
}


def failure_reason(exc: BaseException) -> str:
    """The key of :data:`FAILURE_REASONS` for an error met while fetching or decoding one image."""
    if isinstance(exc, BadImage):
        return exc.reason if exc.reason in FAILURE_REASONS else "bad_image"
    for kind, reason in ((ObjectMissing, "missing"), (ForbiddenURI, "forbidden"), (ObjectTooLarge, "too_large"),
                         (TransientStorageError, "unreachable"), (StorageError, "storage")):
        if isinstance(exc, kind):
            return reason
    return "error"
