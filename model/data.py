"""Datasets, batching and batched augmentation for training and evaluation.

Training accepts any ``torch.utils.data.Dataset`` (or sequence) whose items are
``(image uint8 HxWxC, coarse_target, fine_target)``; targets are class indices for single-label
taxonomies and multi-hot vectors for multi-label ones. ``ArraySet`` is the in-memory fast path
(Fashion-MNIST, mosaics): batches are sliced out of one array instead of collated item by item.

Augmentation runs on whole batches as tensor ops (on the training device): on two CPU cores,
per-image PIL transforms would cost more than the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DatasetMissing
from .fmnist import load_split
from .taxonomy import Taxonomy

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass
class ArraySet(torch.utils.data.Dataset):
    images: np.ndarray  # uint8 [N, H, W, C]
    coarse: np.ndarray  # [N] int64, or [N, C] float32 multi-hot
    fine: np.ndarray  # [N] int64, or [N, F] float32 multi-hot

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.coarse[i], self.fine[i]

    def subset(self, n: int | None) -> ArraySet:
        if n is None or n >= len(self):
            return self
        return ArraySet(self.images[:n], self.coarse[:n], self.fine[:n])


def fmnist_dataset(split: str, taxonomy: Taxonomy, source=None, limit: int | None = None) -> ArraySet:
    """Fashion-MNIST as an ArraySet: images [N, 28, 28, 1]; fine = dataset label; coarse = its parent."""
    images, labels = load_split(split, source)  # FashionMNISTMissing is a DatasetMissing
    if len(taxonomy.fine.labels) != 10:
        raise DatasetMissing(f"taxonomy {taxonomy.name!r} has {len(taxonomy.fine.labels)} fine labels; Fashion-MNIST needs 10")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    fine = labels.astype(np.int64)
    if taxonomy.multi_label:
        eye_f = np.eye(len(taxonomy.fine.labels), dtype=np.float32)
        fine_t = eye_f[fine]
        coarse_t = (fine_t @ np.array(taxonomy.parent_matrix(), dtype=np.float32)).clip(0, 1)
        return ArraySet(images[..., None].copy(), coarse_t, fine_t)
    parent = np.array([p[0] for p in taxonomy.parents], dtype=np.int64)
    return ArraySet(images[..., None].copy(), parent[fine], fine)


def _to_tensor(targets) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(targets))
    return t.float() if t.ndim > 1 else t.long()


def collate(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, coarse, fine = zip(*items, strict=True)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x, _to_tensor(coarse), _to_tensor(fine)


def iterate_batches(
    data, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 [B, H, W, C], coarse targets, fine targets)."""
    n = len(data)
    if isinstance(data, ArraySet):
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        for s in range(0, n, batch_size):
            idx = np.sort(order[s : s + batch_size]) if shuffle else order[s : s + batch_size]
            x = torch.from_numpy(data.images[idx])
            yield x, _to_tensor(data.coarse[idx]), _to_tensor(data.fine[idx])
        return
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate, num_workers=0
    )
    yield from loader


def as_dataset(data):
    """Accept a map-style Dataset / sequence as is; a callable returning an iterable of items (or a plain
    iterable) is read once into an in-memory ArraySet (fine for pre-resized images; pass a map-style
    Dataset for sets too big for memory)."""
    if isinstance(data, ArraySet) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return data
    items = data() if callable(data) else data
    images, coarse, fine = [], [], []
    for im, c, f in items:
        im = np.asarray(im, dtype=np.uint8)
        images.append(im[..., None] if im.ndim == 2 else im)
        coarse.append(np.asarray(c))
        fine.append(np.asarray(f))
    if not images:
        return ArraySet(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
    c_arr, f_arr = np.stack(coarse), np.stack(fine)
    c_arr = c_arr.astype(np.float32) if c_arr.ndim > 1 else c_arr.astype(np.int64)
    f_arr = f_arr.astype(np.float32) if f_arr.ndim > 1 else f_arr.astype(np.int64)
    return ArraySet(np.stack(images), c_arr, f_arr)


def fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 NHWC with 1, 3 or 4 channels -> ``channels`` (RGB -> luma as PIL's "L"; grey -> repeated)."""
    c = x.shape[-1]
    if c == channels:
        return x
    if channels == 1 and c in (3, 4):
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device)
        return (x[..., :3].float() @ w).round().clamp(0, 255).to(torch.uint8).unsqueeze(-1)
    if channels == 3 and c == 1:
        return x.expand(*x.shape[:3], 3)
    if channels == 3 and c == 4:
        return x[..., :3]
    raise ValueError(f"model wants {channels} channels, images have {c}")


def n_batches(data, batch_size: int) -> int:
    return math.ceil(len(data) / batch_size)


def to_input(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    input_size: int,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC on the target device -> normalised float NCHW at ``input_size``."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class Augment:
    """Train-time preset: random crop with zero padding, horizontal flip, random erasing."""

    pad: int = 2
    flip: bool = True
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x: uint8 NHWC -> same shape, randomly shifted by up to ``pad`` px and flipped."""
        n, h, w, _ = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (0, 0, p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g, device=x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g, device=x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
            x = xp[torch.arange(n, device=x.device)[:, None, None], rows, cols]
        if self.flip:
            flip = torch.rand(n, generator=g, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
        return x

    def erase(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """x: normalised float NCHW; erased rectangles are set to 0 (the mean)."""
        if self.erase_p <= 0:
            return x
        n, _, h, w = x.shape
        dev = x.device
        area = torch.empty(n, device=dev).uniform_(*self.erase_scale, generator=g) * h * w
        logr = torch.empty(n, device=dev).uniform_(math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1]), generator=g)
        r = torch.exp(logr)
        eh = torch.sqrt(area * r).round().clamp(1, h).long()
        ew = torch.sqrt(area / r).round().clamp(1, w).long()
        top = (torch.rand(n, generator=g, device=dev) * (h - eh + 1).float()).long()
        left = (torch.rand(n, generator=g, device=dev) * (w - ew + 1).float()).long()
        ar_h = torch.arange(h, device=dev)[None, :]
        ar_w = torch.arange(w, device=dev)[None, :]
        in_r = (ar_h >= top[:, None]) & (ar_h < (top + eh)[:, None])
        in_c = (ar_w >= left[:, None]) & (ar_w < (left + ew)[:, None])
        apply = torch.rand(n, generator=g, device=dev) < self.erase_p
        mask = (in_r[:, :, None] & in_c[:, None, :]) & apply[:, None, None]
        return x.masked_fill(mask[:, None], 0.0)


def mosaic_dataset(
    images: np.ndarray, labels: np.ndarray, taxonomy: Taxonomy, n: int, seed: int = 0, tiles: int = 4
) -> ArraySet:
    """2x2 mosaics of Fashion-MNIST items; fine targets = multi-hot set of the classes present,
    coarse targets = the union of their parents. ``tiles`` (1-4) of the 4 cells hold an item, the rest
    stay blank, so label sets vary in size."""
    rng = np.random.default_rng(seed)
    h, w = images.shape[1:3]
    n_f = len(taxonomy.fine.labels)
    out = np.zeros((n, 2 * h, 2 * w, 1), dtype=np.uint8)
    fine = np.zeros((n, n_f), dtype=np.float32)
    for i in range(n):
        k = rng.integers(1, tiles + 1)
        cells = rng.choice(4, size=k, replace=False)
        picks = rng.integers(0, len(images), size=k)
        for cell, j in zip(cells, picks, strict=True):
            r, c = divmod(int(cell), 2)
            out[i, r * h : (r + 1) * h, c * w : (c + 1) * w, 0] = images[j]
            fine[i, labels[j]] = 1.0
    coarse = (fine @ np.array(taxonomy.parent_matrix(), dtype=np.float32)).clip(0, 1)
    return ArraySet(out, coarse, fine)
