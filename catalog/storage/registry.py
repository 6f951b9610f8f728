"""The backend protocol, what a backend returns, and the registry that picks a backend by URI scheme.

A backend is a class with ``schemes`` (the URI schemes it serves), ``syntax`` (the rule of
:mod:`catalog.storage.uri` that parses its URIs) and ``from_settings(settings)``; its instances answer
``head(loc)`` and ``read(loc, max_bytes)``, and those that can hold our own store also ``put`` and
``matches``. Adding a backend is one module and one ``register(...)`` line in the package's
``__init__``; nothing else branches on the scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from catalog.errors import ObjectTooLarge

if TYPE_CHECKING:
    from urllib.parse import SplitResult

    from catalog.settings import Settings
    from catalog.storage.uri import Location


@dataclass(frozen=True)
class ObjectInfo:
    """Size and version of one object; ``version`` changes whenever its bytes change (see the package
    docstring for each backend's rule)."""

    size: int
    version: str


@dataclass(frozen=True)
class Fetched:
    """The bytes of one object and the version of exactly those bytes (the same string ``head`` gives)."""

    data: bytes
    version: str


class Backend(Protocol):
    schemes: ClassVar[tuple[str, ...]]
    syntax: ClassVar[Callable[[str, SplitResult, str], Location]]

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend: ...

    def head(self, loc: Location) -> ObjectInfo: ...

    def read(self, loc: Location, max_bytes: int | None) -> Fetched: ...


@runtime_checkable
class WritableBackend(Protocol):
    """A backend that can hold our own store (importers write there)."""

    def put(self, loc: Location, data: bytes, content_type: str | None = None) -> ObjectInfo: ...

    def matches(self, loc: Location, data: bytes) -> ObjectInfo | None:
        """The object's info if it holds exactly ``data``, else None (missing or different)."""


_BACKENDS: dict[str, type] = {}


def register(backend: type) -> type:
    """Serve ``backend.schemes`` with ``backend`` (the last registration of a scheme wins)."""
    for scheme in backend.schemes:
        _BACKENDS[scheme] = backend
    return backend


def backend_class(scheme: str) -> type | None:
    return _BACKENDS.get(scheme)


def schemes() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def open_backends(settings: Settings, wanted: set[str]) -> dict[str, Backend]:
    """One backend instance per class serving any of ``wanted``, configured from ``settings``."""
    made: dict[type, Backend] = {}
    out: dict[str, Backend] = {}
    for scheme in sorted(wanted):
        cls = _BACKENDS.get(scheme)
        if cls is None:
            continue
        if cls not in made:
            made[cls] = cls.from_settings(settings)
        out[scheme] = made[cls]
    return out


def too_large(uri: str, size: int, limit: int) -> ObjectTooLarge:
    return ObjectTooLarge(f"object {uri[:200]} is {size} bytes, over the limit of {limit}")
