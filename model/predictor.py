"""Batched inference from a checkpoint. Preprocessing (size, channels, mean/std, thresholds) comes from
the checkpoint's metadata, never from the caller.

The per-image Python work is limited to building the small ``Prediction`` objects: decoding, thresholds
and the primary pair are computed on whole-batch tensors, and the results cross to the host in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .consistency import child_mask, decode_multi, decode_single, parent_index
from .data import fit_channels, to_input
from .errors import CheckpointError, TaxonomyError
from .metadata import DEFAULT_THRESHOLDS
from .net import build_model, pick_device
from .taxonomy import Taxonomy


@dataclass
class Prediction:
    coarse_scores: list[float]
    fine_scores: list[float]
    primary_coarse: int
    primary_fine: int
    coarse_tags: list[tuple[int, float]]
    fine_tags: list[tuple[int, float]]


def load_model(path: str | Path, device: str | None = None):
    """(model in eval mode on device, metadata, taxonomy, device) from a checkpoint."""
    state, meta = load_checkpoint(path)
    try:
        tax = Taxonomy.from_dict(meta["taxonomy"])
    except TaxonomyError as exc:
        raise CheckpointError(f"{path}: bad taxonomy in metadata: {exc}") from None
    dev = pick_device(device)
    model = build_model(meta["backbone"], len(tax.coarse.labels), len(tax.fine.labels), int(meta["channels"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match backbone {meta['backbone']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    model = model.to(dev).eval()
    return model, meta, tax, dev


class Predictor:
    """``Predictor.from_checkpoint(path).predict(uint8 batch (N, H, W, C))`` -> list[Prediction]."""

    def __init__(self, model: torch.nn.Module, meta: dict, taxonomy: Taxonomy, device: torch.device,
                 batch_size: int = 256):
        self.model = model
        self.meta = meta
        self.taxonomy = taxonomy
        self.device = device
        self.batch_size = batch_size
        self.model_version: str = meta["model_version"]
        self.trained_at: datetime = datetime.fromisoformat(meta.get("trained_at") or "1970-01-01T00:00:00+00:00")
        if self.trained_at.tzinfo is None:
            from datetime import UTC

            self.trained_at = self.trained_at.replace(tzinfo=UTC)
        self.input_size: int = int(meta["input_size"])
        self.channels: int = int(meta["channels"])
        self.backbone: str = meta["backbone"]
        thresholds = {**DEFAULT_THRESHOLDS, **(meta.get("thresholds") or {})}
        self.thresholds = {"coarse": float(thresholds["coarse"]), "fine": float(thresholds["fine"])}
        self._mean = torch.tensor(meta["mean"], dtype=torch.float32, device=device)
        self._std = torch.tensor(meta["std"], dtype=torch.float32, device=device)
        self._multi = taxonomy.multi_label
        self._mask = child_mask(taxonomy.parents, len(taxonomy.coarse.labels), device)
        self._parent = None if self._multi else parent_index(taxonomy.parents, device)
        self._mask_np = self._mask.cpu().numpy().astype(np.int32)
        self._cuda = device.type == "cuda"
        self._amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self._cuda else None
        self._channels_last = True
        self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, batch_size: int = 256) -> Predictor:
        model, meta, tax, dev = load_model(path, device)
        return cls(model, meta, tax, dev, batch_size)

    # ------------------------------------------------------------------ input

    def _as_uint8(self, batch) -> torch.Tensor:
        if isinstance(batch, list | tuple):
            if not batch:
                return torch.empty((0, self.input_size, self.input_size, self.channels), dtype=torch.uint8)
            batch = np.stack([np.asarray(im) for im in batch])
        if isinstance(batch, torch.Tensor):
            x = batch
        else:
            arr = np.ascontiguousarray(batch)
            x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if x.dtype != torch.uint8:
            raise ValueError(f"predict wants uint8 images, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4:
            raise ValueError(f"predict wants (N, H, W, C) images, got shape {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------ inference

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (host or device) -> [N, C + F + 2] float on the host (scores, primary pair)."""
        x = fit_channels(x.to(self.device, non_blocking=True), self.channels)
        xin = to_input(x, self._mean, self._std, self.input_size, self._channels_last)
        with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._cuda):
            c, f = self.model(xin)
        if self._multi:
            cs, fs, pc, pf = decode_multi(c, f, self._mask)
        else:
            cs, fs, pc, pf = decode_single(c, f, self._parent)
        return torch.cat([cs, fs, pc[:, None].float(), pf[:, None].float()], 1).cpu()

    def _run_all(self, x: torch.Tensor) -> torch.Tensor:
        outs, i, bs = [], 0, max(1, self.batch_size)
        while i < len(x):
            try:
                outs.append(self._run(x[i : i + bs]))
                i += bs
            except torch.cuda.OutOfMemoryError:
                if bs == 1 or not self._cuda:
                    raise
                bs //= 2
                torch.cuda.empty_cache()
                self.batch_size = bs  # remember: the next call starts at the size that fit
        return torch.cat(outs) if outs else torch.empty(0, len(self.taxonomy.coarse.labels) + len(self.taxonomy.fine.labels) + 2)

    def predict_arrays(self, batch) -> dict[str, np.ndarray]:
        """Whole-batch numpy results: coarse_scores [N,C], fine_scores [N,F], primary_coarse [N],
        primary_fine [N], coarse_tags / fine_tags boolean masks (score >= threshold, or primary)."""
        x = self._as_uint8(batch)
        out = self._run_all(x).numpy()
        nc = len(self.taxonomy.coarse.labels)
        cs, fs = out[:, :nc], out[:, nc:-2]
        pc, pf = out[:, -2].astype(np.int64), out[:, -1].astype(np.int64)
        rows = np.arange(len(out))
        ctag = cs >= self.thresholds["coarse"]
        ftag = fs >= self.thresholds["fine"]
        ctag[rows, pc] = True
        ftag[rows, pf] = True
        if not self._multi:
            # a fine tag always brings its parent (the scores guarantee it; this keeps the masks exact)
            ctag |= (ftag.astype(np.int32) @ self._mask_np.T) > 0
        return {"coarse_scores": cs, "fine_scores": fs, "primary_coarse": pc, "primary_fine": pf,
                "coarse_tags": ctag, "fine_tags": ftag}

    def predict(self, batch) -> list[Prediction]:
        a = self.predict_arrays(batch)
        cs, fs = a["coarse_scores"].tolist(), a["fine_scores"].tolist()
        pcs, pfs = a["primary_coarse"].tolist(), a["primary_fine"].tolist()
        ctags = _tags(a["coarse_tags"], a["coarse_scores"])
        ftags = _tags(a["fine_tags"], a["fine_scores"])
        return [Prediction(c, f, pc, pf, ct, ft) for c, f, pc, pf, ct, ft in zip(cs, fs, pcs, pfs, ctags, ftags, strict=True)]


def _tags(mask: np.ndarray, scores: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per row: [(label, score)] of the masked labels, best first."""
    n = len(mask)
    rows, cols = np.nonzero(mask)
    vals = scores[rows, cols]
    order = np.lexsort((-vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    bounds = np.searchsorted(rows, np.arange(n + 1))
    cl, vl = cols.tolist(), vals.tolist()
    return [list(zip(cl[bounds[i] : bounds[i + 1]], vl[bounds[i] : bounds[i + 1]], strict=True)) for i in range(n)]
