"""Read a checkpoint's metadata without torch (the producer and the CLI stay light and fork-safe)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from catalog.errors import ConfigError
from catalog.settings import Settings


def checkpoint_path(settings: Settings) -> Path:
    if settings.model_path:
        return Path(settings.model_path)
    from model.weights import DEFAULT_CHECKPOINT

    return Path(DEFAULT_CHECKPOINT)


def checkpoint_metadata(settings: Settings) -> dict:
    path = checkpoint_path(settings)
    try:
        from model.checkpoint import read_metadata
    except ImportError:  # pragma: no cover
        read_metadata = _read_safetensors_metadata
    if not path.is_file():
        raise ConfigError(f"model checkpoint {path} not found; set STYLETAG_MODEL to a .safetensors file")
    try:
        return read_metadata(path)
    except Exception as exc:
        raise ConfigError(f"cannot read model checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None


def _read_safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__", {})
    return json.loads(meta["styletag"]) if "styletag" in meta else meta
