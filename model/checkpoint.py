"""Checkpoint format: one ``.safetensors`` file; its string metadata key ``styletag`` holds JSON.

The JSON metadata (see ``docs/model.md``): taxonomy (``Taxonomy.to_dict()``), backbone, input_size,
channels, mean, std, thresholds, model_version, trained_at (ISO-8601 UTC), command, data, metrics, and
``train`` (epoch/history, for resume). ``model_version`` (format 2, ``model.metadata.FORMAT``) is the first 16
hex digits of a sha256 over the weight tensors in sorted-name order (name, dtype, shape, bytes) and over the
metadata that changes predictions (``model.metadata.prediction_meta``: taxonomy, preprocessing, thresholds,
temperature, review threshold, ...): a tampered file, weights or metadata, does not load, and a checkpoint
re-saved with other thresholds is another model. Format 1 (older checkpoints: the weights only) still loads.

Loading never unpickles: safetensors only. Resume state (optimizer moments) goes to a sibling
``<name>.optim.safetensors`` file in the same format.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .metadata import FORMAT, META_KEY, REQUIRED, check_header, combine_version, is_legacy, read_metadata

__all__ = ["CheckpointError", "load_checkpoint", "model_version_of", "read_metadata", "save_checkpoint",
           "weights_hash"]


def tensors_of(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def weights_hash(state: dict[str, torch.Tensor], digits: int = 16) -> str:
    """sha256 of the tensors in canonical order; first ``digits`` hex digits (the format-1 version)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:digits]


def model_version_of(state: dict[str, torch.Tensor], meta: dict) -> str:
    """What ``meta["model_version"]`` must be for these weights: format 2 hashes the weights and the
    prediction metadata, format 1 (legacy) the weights only."""
    if is_legacy(meta):
        return weights_hash(state)
    return combine_version(weights_hash(state, digits=64), meta)


def save_checkpoint(path: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], meta: dict) -> str:
    """Write weights + metadata atomically (temp file, then rename); return model_version."""
    path = Path(path)
    state = tensors_of(model)
    meta = dict(meta)
    meta["format"] = FORMAT
    meta["model_version"] = model_version_of(state, meta)
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return meta["model_version"]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict on CPU, metadata). Verifies ``model_version`` against the weights (and, format 2,
    the prediction metadata)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0]}") from None
    got = model_version_of(state, meta)
    if got != meta["model_version"]:
        what = "weights hash" if is_legacy(meta) else "hash of weights and metadata"
        raise CheckpointError(
            f"{path} was modified: {what} {got} != recorded model_version {meta['model_version']}"
        )
    return state, meta


def optim_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".optim.safetensors")


def save_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer moments as flat tensors ``<param index>.<key>``; scalars in the JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}.{key}"] = val.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = val
    groups = [{k: v for k, v in g.items() if isinstance(v, int | float | bool | list | str | None)} for g in sd["param_groups"]]
    target = optim_path(path)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps({"scalars": scalars, "param_groups": groups})})
    os.replace(tmp, target)


def load_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> bool:
    """Restore optimizer state saved by ``save_optimizer``; False when there is no optimizer file."""
    target = optim_path(path)
    if not target.is_file():
        return False
    check_header(target)
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as fh:
        extra = json.loads((fh.metadata() or {})[META_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, v in extra["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    current = optimizer.state_dict()
    groups = []
    for g_now, g_saved in zip(current["param_groups"], extra["param_groups"], strict=True):
        g = dict(g_now)
        g.update({k: v for k, v in g_saved.items() if k != "params"})
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True
