"""User-facing errors of the model package.

They subclass ``click.ClickException`` so the ``styletag`` CLI prints ``error: <one line>`` and exits
non-zero without a traceback; library callers can catch ``ModelError`` like any exception.
"""

from __future__ import annotations

import click


class ModelError(click.ClickException):
    """Base for every model error a user may see; the message is one line that says what to do."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class DatasetMissing(ModelError):
    """A dataset's files are not on disk."""


class PretrainedUnavailable(ModelError):
    """``--pretrained`` was asked for but torchvision's weights are not in the local cache."""


class UnknownBackbone(ModelError):
    """A backbone name that the registry does not know."""
