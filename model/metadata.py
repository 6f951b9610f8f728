"""A checkpoint's metadata, typed, read without torch (the producer, the CLI and the registry stay light).

A checkpoint is one ``.safetensors`` file whose string metadata key ``styletag`` holds JSON (see
``docs/model.md``). :func:`read_metadata` parses that header (never a pickle) and :class:`CheckpointMeta`
gives it types. ``model.checkpoint`` (torch) writes and verifies checkpoints on top of this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError, TaxonomyError
from .taxonomy import Taxonomy

META_KEY = "styletag"
REQUIRED = ("taxonomy", "backbone", "input_size", "channels", "mean", "std", "model_version")
DEFAULT_THRESHOLDS = {"coarse": 0.5, "fine": 0.5}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Format 2: model_version hashes the weights AND every metadata key that can change a prediction
# (taxonomy, backbone, preprocessing, input size, channels, mean/std, thresholds, temperature, review
# threshold, ... : everything except the bookkeeping keys below, so a key added later counts too).
# Format 1 (older checkpoints): model_version hashes the weights only; still loadable.
FORMAT = "styletag-checkpoint/2"
LEGACY_FORMAT = "styletag-checkpoint/1"
BOOKKEEPING_KEYS = frozenset({
    "model_version", "format", "trained_at", "command", "metrics", "data", "train", "config", "parent", "notes",
})


def prediction_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata that decides what the model predicts (everything but the bookkeeping keys)."""
    return {k: v for k, v in meta.items() if k not in BOOKKEEPING_KEYS}


def prediction_digest(meta: dict[str, Any]) -> str:
    """sha256 of :func:`prediction_meta` as canonical JSON (sorted keys, no spaces)."""
    blob = json.dumps(prediction_meta(meta), sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def combine_version(weights_digest: str, meta: dict[str, Any]) -> str:
    """The format-2 model_version: first 16 hex digits of sha256(weights digest, prediction digest)."""
    return hashlib.sha256(f"{weights_digest}:{prediction_digest(meta)}".encode()).hexdigest()[:16]


def is_legacy(meta: dict[str, Any]) -> bool:
    """A format-1 checkpoint: its model_version covers the weights only."""
    return meta.get("format", LEGACY_FORMAT) != FORMAT


def has_gate(meta: dict[str, Any], source: str = "checkpoint") -> bool:
    """Whether the network has the fine head's gate: metadata ``"gate": false`` for the ablation without it;
    absent (every checkpoint before the key, and every gated one since) means true, so their model_version
    is unchanged."""
    gate = meta.get("gate", True)
    if not isinstance(gate, bool):
        raise CheckpointError(f"{source}: metadata 'gate' must be true or false, not {str(gate)[:40]}")
    return gate


def check_header(path: Path) -> None:
    """Refuse anything that is not a safetensors file before parsing it (a pickle is never opened)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= os.path.getsize(path):
            return  # a safetensors header (its length may well start with byte 0x80, like a pickle)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(f"{path} is a pickle/torch.save file; refusing to unpickle it (use a .safetensors checkpoint)")
    raise CheckpointError(f"{path} is not a safetensors file")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The styletag metadata of a checkpoint as a dict (no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    check_header(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (bad header)") from None
    raw = (header.get("__metadata__") or {}).get(META_KEY) if isinstance(header, dict) else None
    if raw is None:
        raise CheckpointError(f"{path} has no styletag metadata; it was not written by styletag train")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: styletag metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: styletag metadata is not a JSON object")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    return meta


def _trained_at(raw: str | None) -> datetime:
    if not raw:
        return EPOCH
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        return EPOCH
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


@dataclass(frozen=True)
class CheckpointMeta:
    """The fields the worker, the registry and evaluation use; ``raw`` keeps everything else."""

    model_version: str
    taxonomy: Taxonomy
    backbone: str
    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    thresholds: dict[str, float]
    trained_at: datetime
    command: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, meta: dict[str, Any], source: str = "checkpoint") -> CheckpointMeta:
        try:
            taxonomy = Taxonomy.from_dict(meta["taxonomy"])
        except TaxonomyError as exc:
            raise CheckpointError(f"{source}: bad taxonomy in metadata: {exc}") from None
        try:
            thresholds = {**DEFAULT_THRESHOLDS, **(meta.get("thresholds") or {})}
            return cls(
                model_version=str(meta["model_version"]),
                taxonomy=taxonomy,
                backbone=str(meta["backbone"]),
                input_size=int(meta["input_size"]),
                channels=int(meta["channels"]),
                mean=tuple(float(x) for x in meta["mean"]),
                std=tuple(float(x) for x in meta["std"]),
                thresholds={k: float(v) for k, v in thresholds.items()},
                trained_at=_trained_at(meta.get("trained_at")),
                command=str(meta.get("command") or ""),
                metrics=dict(meta.get("metrics") or {}),
                raw=dict(meta),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed metadata ({exc.__class__.__name__}: {exc})") from None

    @classmethod
    def read(cls, path: str | Path) -> CheckpointMeta:
        return cls.from_dict(read_metadata(path), str(path))
