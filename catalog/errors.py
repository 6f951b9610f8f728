"""Typed errors. Each one carries a single line that tells the user what went wrong and what to do.

The base class and the model's errors live in ``model.errors`` (one family); the CLI prints
``error: <message>`` and exits with ``exit_code``; nothing here ever shows a traceback.
"""

from __future__ import annotations

from model.errors import BadImage, DatasetMissing, StyletagError, TaxonomyError

__all__ = [
    "BadImage", "ConfigError", "DatasetMissing", "ForbiddenURI", "NotFound", "ObjectMissing", "ObjectTooLarge",
    "ServiceUnavailable", "StorageError", "StyletagError", "TaxonomyError", "TaxonomyMismatch", "TransientStorageError",
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
