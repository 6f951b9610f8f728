"""Batched inference from a checkpoint. Everything that shapes a prediction comes from the checkpoint's
metadata, never from the caller: the preprocessing (``model.preprocess.PreprocessSpec``: size, channels,
mean/std, how the photo is fitted), the tag thresholds, the temperature and review thresholds, and whether
(and how) garment colours are named.

The per-image Python work is limited to building the small ``Prediction`` objects: decoding, thresholds,
the primary pair and the review score are computed on whole-batch tensors, and the results cross to the
host in one copy.

Review (the metadata keys ``model.calibration`` documents; training fits them on validation): with a
``temperature`` each head's logits are divided by its temperature before the consistent decoding, so the
served scores are the calibrated ones (``model.calibration.served_scores``); every prediction then gets
``review_score`` (``model.calibration.review_score``) and ``out_of_distribution``
(``model.calibration.out_of_distribution``: the score under ``ood_threshold``, or the checkpoint's
``frame_rule`` finds no garment in the uint8 model input). Both come from those very functions, on the whole
batch's logits and inputs. A checkpoint without ``temperature`` and ``review_score``
keys gives no review score (the pipeline then holds on the primary fine score, as before); its photo spec
still flags frames; a legacy spec analyses nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from . import calibration
from .checkpoint import load_checkpoint
from .colour import NAMES
from .consistency import child_mask, decode_multi, decode_single, parent_index
from .errors import CheckpointError, TaxonomyError
from .metadata import DEFAULT_THRESHOLDS, has_gate
from .net import build_model, pick_device
from .preprocess import PreprocessSpec, to_tensor
from .taxonomy import Taxonomy

log = logging.getLogger("styletag.model")


@dataclass
class Prediction:
    coarse_scores: list[float]
    fine_scores: list[float]
    primary_coarse: int
    primary_fine: int
    coarse_tags: list[tuple[int, float]]
    fine_tags: list[tuple[int, float]]
    review_score: float | None = None  # model.calibration.review_score (calibrated checkpoints)
    out_of_distribution: bool = False


@dataclass(frozen=True)
class ColourTagging:
    """How a checkpoint names garment colours (``"colour"`` in its metadata): the palette names it tags
    with (``model.colour.NAMES`` or a subset), at most ``max_colours`` per product, a second one only
    when it covers ``min_share`` of the garment."""

    palette: tuple[str, ...] = NAMES
    max_colours: int = 2
    min_share: float = 0.25


def colour_tagging(meta: dict, spec: PreprocessSpec, source: str = "checkpoint") -> ColourTagging | None:
    """The checkpoint's colour tagging, or None. ``"colour": {"palette": [...], "max_colours": 2,
    "min_share": 0.25}`` (each key optional) switches it on, ``"colour": false`` off; without the key it is
    on for photo preprocessing (the backdrop is fitted anyway) and off for the legacy one (grey, stretched:
    nothing to name colours on)."""
    raw = meta.get("colour", None if spec.is_legacy else {})
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: metadata 'colour' must be an object or false, not {type(raw).__name__}")
    if spec.is_legacy:
        raise CheckpointError(f"{source}: colour tags need a photo preprocessing (metadata 'preprocess'); "
                              "the legacy one decodes grey, stretched")
    palette = tuple(raw.get("palette") or NAMES)
    unknown = [str(n)[:40] for n in palette if n not in NAMES]
    if unknown or len(set(palette)) != len(palette):
        raise CheckpointError(f"{source}: colour palette names {unknown or 'repeated'} are not model.colour's "
                              f"palette ({', '.join(NAMES)})")
    try:
        tagging = ColourTagging(palette, int(raw.get("max_colours", 2)), float(raw.get("min_share", 0.25)))
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: colour max_colours / min_share must be numbers") from None
    if not 1 <= tagging.max_colours <= 3 or not 0 < tagging.min_share <= 1:
        raise CheckpointError(f"{source}: colour max_colours must be 1-3 and min_share in (0, 1]")
    return tagging


def _check_review_keys(meta: dict, n_coarse: int, n_fine: int, source: str) -> None:
    """Malformed review metadata is refused at load (one line), not at the first batch: the function that
    serves it runs once on a dummy input."""
    for key in ("review_threshold", "ood_threshold"):
        if meta.get(key) is not None and (isinstance(meta[key], bool) or not isinstance(meta[key], int | float)):
            raise CheckpointError(f"{source}: metadata {key!r} must be a number")
    t = meta.get("temperature")
    if t is not None:
        values = list(t.values()) if isinstance(t, dict) else [t]
        if not values or not all(isinstance(v, int | float) and 0 < v < float("inf") for v in values):
            raise CheckpointError(f"{source}: metadata 'temperature' must be a positive number or "
                                  f"{{'coarse': T, 'fine': T}}, not {str(t)[:80]}")
    if meta.get("review_score") is not None and not isinstance(meta["review_score"], dict):
        raise CheckpointError(f"{source}: metadata 'review_score' must be an object like {{'kind': 'msp'}}")
    kind = (meta.get("review_score") or {}).get("kind", "msp")
    if kind not in calibration.SCORE_KINDS:
        raise CheckpointError(f"{source}: metadata 'review_score' kind must be one of "
                              f"{', '.join(calibration.SCORE_KINDS)}, not {str(kind)[:40]!r}")
    if meta.get("frame_rule") is not None and not isinstance(meta["frame_rule"], dict):
        raise CheckpointError(f"{source}: metadata 'frame_rule' must be an object")
    try:
        calibration.out_of_distribution(np.zeros((1, n_coarse)), np.zeros((1, n_fine)), meta,
                                        np.zeros((1, 4, 4, 1), np.uint8))
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{source}: malformed review metadata: {exc.__class__.__name__}: "
                              f"{str(exc)[:160]}") from None


def _frame_rule(meta: dict, spec: PreprocessSpec) -> dict | None:
    """The checkpoint's ``frame_rule`` (``model.calibration.frame_flags`` on the uint8 model input), or None:
    absent, or a legacy spec (channel 0 is then no distance from a backdrop)."""
    raw = meta.get("frame_rule")
    return None if spec.is_legacy or not raw else raw


def load_model(path: str | Path, device: str | None = None):
    """(model in eval mode on device, metadata, taxonomy, device) from a checkpoint."""
    state, meta = load_checkpoint(path)
    try:
        tax = Taxonomy.from_dict(meta["taxonomy"])
    except TaxonomyError as exc:
        raise CheckpointError(f"{path}: bad taxonomy in metadata: {exc}") from None
    dev = pick_device(device)
    model = build_model(meta["backbone"], len(tax.coarse.labels), len(tax.fine.labels), int(meta["channels"]),
                        gate=has_gate(meta, str(path)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match backbone {meta['backbone']!r}: "
                              f"{str(exc).splitlines()[0]}") from None
    model = model.to(dev).eval()
    return model, meta, tax, dev


def fuse_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each batch norm folded into the convolution before it (``torch.fx``'s conv-bn fusion;
    eval mode only): the same function up to float rounding (logits within ~1e-5), 14-18 % faster on the CPU
    for the shipped resnet-small (measured at batch 256, one thread). A backbone that cannot be traced is
    served as it is."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or model.training:
        return model
    try:
        from torch.fx.experimental.optimization import fuse

        model.backbone = fuse(backbone)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: any tracing failure keeps the original
        log.debug("batch-norm fusion skipped for %s: %s", type(backbone).__name__, exc)
    return model


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
        source = f"model {self.model_version}"
        try:
            self.spec = PreprocessSpec.from_checkpoint_meta(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: bad preprocessing in metadata: {exc}") from None
        if (self.spec.input_size, self.spec.channels) != (int(meta["input_size"]), int(meta["channels"])):
            raise CheckpointError(f"{source}: metadata 'preprocess' says {self.spec.channels} channels at "
                                  f"{self.spec.input_size} px, the network was built for {meta['channels']} at "
                                  f"{meta['input_size']} px")
        self.input_size: int = self.spec.input_size
        self.channels: int = self.spec.channels
        self.backbone: str = meta["backbone"]
        thresholds = {**DEFAULT_THRESHOLDS, **(meta.get("thresholds") or {})}
        self.thresholds = {"coarse": float(thresholds["coarse"]), "fine": float(thresholds["fine"])}
        _check_review_keys(meta, len(taxonomy.coarse.labels), len(taxonomy.fine.labels), source)
        t_coarse, t_fine = calibration.temperatures(meta)
        self.temperature = {"coarse": t_coarse, "fine": t_fine} if meta.get("temperature") is not None else None
        self.reviews = meta.get("temperature") is not None or meta.get("review_score") is not None
        self.review_threshold = None if meta.get("review_threshold") is None else float(meta["review_threshold"])
        self.ood_threshold = None if meta.get("ood_threshold") is None else float(meta["ood_threshold"])
        self.frame_rule: dict | None = _frame_rule(meta, self.spec)
        self.colours: ColourTagging | None = colour_tagging(meta, self.spec, source)
        self._multi = taxonomy.multi_label
        self.score_map: dict | None = meta.get("score_map")
        if self.score_map is not None:
            try:
                calibration.check_score_map(self.score_map, self._multi)
            except ValueError as exc:
                raise CheckpointError(f"{source}: metadata 'score_map': {exc}") from None
        self._mask = child_mask(taxonomy.parents, len(taxonomy.coarse.labels), device)
        self._parent = None if self._multi else parent_index(taxonomy.parents, device)
        self._parent_np = None if self._parent is None else self._parent.cpu().numpy()
        self._mask_np = self._mask.cpu().numpy().astype(np.int32)
        self._cuda = device.type == "cuda"
        self._amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self._cuda else None
        self._channels_last = True
        self.model = fuse_for_inference(self.model).to(memory_format=torch.channels_last)

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

    def input_tensor(self, batch) -> torch.Tensor:
        """The network's input for uint8 images (N, H, W, C): ``model.preprocess.to_tensor`` with this
        checkpoint's spec, on this predictor's device, exactly what training feeds the network."""
        return to_tensor(self._as_uint8(batch), self.spec, self.device, self._channels_last)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (host or device) -> [N, C + F + 2 + C + F] float on the host: the served scores, the
        primary pair and the raw logits (for the review score), in one copy."""
        xin = to_tensor(x, self.spec, self.device, self._channels_last)
        with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._cuda):
            c, f = self.model(xin)
        c, f = c.float(), f.float()
        sc, sf = c, f
        if self.temperature is not None:  # the served scores are the calibrated ones
            # model.calibration.served_scores: each head's logits over its temperature, then the decoding
            sc, sf = c / self.temperature["coarse"], f / self.temperature["fine"]
        if self._multi:
            cs, fs, pc, pf = decode_multi(sc, sf, self._mask)
        else:
            cs, fs, pc, pf = decode_single(sc, sf, self._parent)
        return torch.cat([cs, fs, pc[:, None].float(), pf[:, None].float(), c, f], 1).cpu()

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
        nc, nf = len(self.taxonomy.coarse.labels), len(self.taxonomy.fine.labels)
        return torch.cat(outs) if outs else torch.empty(0, 2 * (nc + nf) + 2)

    def predict_arrays(self, batch) -> dict[str, np.ndarray]:
        """Whole-batch numpy results: coarse_scores [N,C], fine_scores [N,F], primary_coarse [N],
        primary_fine [N], coarse_tags / fine_tags boolean masks (score >= threshold, or primary), the raw
        coarse_logits / fine_logits, review_score [N] (None for a checkpoint without temperature and
        review_score keys) and out_of_distribution [N] (bool: ``model.calibration.out_of_distribution``, the
        checkpoint's frame rule read on these very uint8 inputs)."""
        x = self._as_uint8(batch)
        out = self._run_all(x).numpy()
        nc, nf = len(self.taxonomy.coarse.labels), len(self.taxonomy.fine.labels)
        cs, fs = out[:, :nc], out[:, nc : nc + nf]
        if self.score_map is not None:  # the served scores' shape, fitted on validation (model.calibration)
            cs, fs = calibration.map_scores(cs, fs, self._parent_np, self.score_map)
        pc, pf = out[:, nc + nf].astype(np.int64), out[:, nc + nf + 1].astype(np.int64)
        cl, fl = out[:, nc + nf + 2 : 2 * nc + nf + 2], out[:, 2 * nc + nf + 2 :]
        images = x.numpy() if self.frame_rule is not None and len(out) else None
        review = None
        if self.reviews and len(out):
            review = calibration.review_score(cl, fl, self.meta)
            ood = calibration.out_of_distribution(cl, fl, self.meta, images)
        elif images is not None:
            ood = calibration.frame_flags(images, self.meta)
        else:
            ood = np.zeros(len(out), dtype=bool)
        rows = np.arange(len(out))
        ctag = cs >= self.thresholds["coarse"]
        ftag = fs >= self.thresholds["fine"]
        ctag[rows, pc] = True
        ftag[rows, pf] = True
        if not self._multi:
            # a fine tag always brings its parent (the scores guarantee it; this keeps the masks exact)
            ctag |= (ftag.astype(np.int32) @ self._mask_np.T) > 0
        return {"coarse_scores": cs, "fine_scores": fs, "primary_coarse": pc, "primary_fine": pf,
                "coarse_tags": ctag, "fine_tags": ftag, "coarse_logits": cl, "fine_logits": fl,
                "review_score": review, "out_of_distribution": np.asarray(ood, dtype=bool)}

    def predict(self, batch) -> list[Prediction]:
        """Per image a :class:`Prediction` (:meth:`predict_arrays`)."""
        a = self.predict_arrays(batch)
        cs, fs = a["coarse_scores"].tolist(), a["fine_scores"].tolist()
        pcs, pfs = a["primary_coarse"].tolist(), a["primary_fine"].tolist()
        ctags = _tags(a["coarse_tags"], a["coarse_scores"])
        ftags = _tags(a["fine_tags"], a["fine_scores"])
        rs = a["review_score"].tolist() if a["review_score"] is not None else [None] * len(cs)
        ood = a["out_of_distribution"].tolist()
        return [Prediction(*row) for row in zip(cs, fs, pcs, pfs, ctags, ftags, rs, ood, strict=True)]


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
