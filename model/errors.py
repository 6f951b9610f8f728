"""The one error family of styletag. Every error a user may see is a :class:`StyletagError`: its message is
one line that says what went wrong and what to do, and ``exit_code`` is the CLI's exit status. The CLI
(``worker.cli``) maps errors by type, never by name.

It lives in ``model/`` because ``model/`` imports nothing of ``catalog/`` or ``worker/``; ``catalog.errors``
re-exports the base and adds the catalog's own errors. No click, no torch here.
"""

from __future__ import annotations


class StyletagError(Exception):
    """Base for every error a user may see; ``exit_code`` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelError(StyletagError):
    """Base for model errors (training, evaluation, checkpoints, backbones)."""


class DatasetMissing(ModelError):
    """A dataset's files are not on disk."""


class PretrainedUnavailable(ModelError):
    """``--pretrained`` was asked for but the weights are not in the local cache."""


class UnknownBackbone(ModelError):
    """A backbone name that the registry does not know."""


class CheckpointError(ModelError):
    """A checkpoint is missing, not safetensors, a pickle, malformed or tampered with."""


class TaxonomyError(ModelError, ValueError):
    """A taxonomy file is malformed; the message says which label or field is wrong."""


class BadImage(StyletagError):
    """Bytes that are not a decodable image, or one refused by the size and pixel limits. ``reason`` is the
    short code stored in ``tag_state.reason``."""

    reason = "bad_image"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
