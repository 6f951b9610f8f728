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
    if not path.is_file():
        raise ConfigError(f"model checkpoint {path} not found; set STYLETAG_MODEL to a .safetensors file")
    try:
        return _read_safetensors_metadata(path)
    except Exception as exc:
        raise ConfigError(f"cannot read model checkpoint {path}: {str(exc).splitlines()[0][:200]}") from None


def _read_safetensors_metadata(path: Path) -> dict:
    """The JSON header of a safetensors file, parsed by hand: importing model.checkpoint would load
    torch (seconds) just to read a model_version. The worker verifies the weights when it loads them."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8 or head[:1] == b"\x80" or head[:2] == b"PK":
            raise ValueError("not a safetensors file (a pickle is never loaded)")
        (n,) = struct.unpack("<Q", head)
        if n > path.stat().st_size:
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(fh.read(n))
    raw = (header.get("__metadata__") or {}).get("styletag")
    if raw is None:
        raise ValueError("no styletag metadata; it was not written by 'styletag train'")
    meta = json.loads(raw)
    if "model_version" not in meta:
        raise ValueError("metadata lacks model_version")
    return meta
