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
        head = fh.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if len(head) < 9 or head[8:9] != b"{" or n > path.stat().st_size:
            raise ValueError("it is a pickle/torch.save file or not safetensors; refusing to unpickle it")
        header = json.loads(head[8:] + fh.read(n - 1))
    raw = (header.get("__metadata__") or {}).get("styletag")
    if raw is None:
        raise ValueError("no styletag metadata; it was not written by 'styletag train'")
    meta = json.loads(raw)
    if "model_version" not in meta:
        raise ValueError("metadata lacks model_version")
    return meta
