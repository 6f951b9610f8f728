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


def holdout_mask(n: int, share: float) -> np.ndarray:
    """Validation items of a training split: a multiplicative hash of the index, ``share`` of them
    (deterministic, spread over the whole split, independent of its order in memory)."""
    if share <= 0:
        return np.zeros(n, dtype=bool)
    h = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return (h % np.uint64(1000)) < np.uint64(round(share * 1000))


def fmnist_split(split: str, source=None, val_share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``train`` (the official training split less its validation share), ``val``
    (that share) or ``test`` (the official test split, never trained or selected on)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}")
    images, labels = load_split("test" if split == "test" else "train", source)
    if split == "test":
        return images, labels
    val = holdout_mask(len(labels), val_share)
    keep = val if split == "val" else ~val
    return images[keep], labels[keep]


def fmnist_dataset(split: str, taxonomy: Taxonomy, source=None, limit: int | None = None,
                   val_share: float = 0.1) -> ArraySet:
    """Fashion-MNIST as an ArraySet: images [N, 28, 28, 1]; fine = dataset label; coarse = its parent.
    ``split``: train | val | test (see :func:`fmnist_split`)."""
    if len(taxonomy.fine.labels) != 10:
        raise DatasetMissing(f"taxonomy {taxonomy.name!r} has {len(taxonomy.fine.labels)} fine labels; Fashion-MNIST needs 10")
    images, labels = fmnist_split(split, source, val_share)  # FashionMNISTMissing is a DatasetMissing
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


@dataclass
class PhotoAugment:
    """Train-time preset for preprocessed photos (``model.preprocess``): the garment's scale, placement,
    aspect and a small rotation (an affine warp that fills with the backdrop's value per channel, or
    replicates the border where the backdrop has no fixed value), a horizontal flip, each channel's
    contrast about the backdrop value, a light blur and light noise. Whole-batch tensor ops on uint8 NHWC,
    deterministic for a generator. Random erasing stays on the normalised input (``Augment.erase``)."""

    pad_value: tuple[int, ...] | None = None
    scale: tuple[float, float] = (0.72, 1.04)  # < 1: the garment smaller in the frame
    aspect: float = 0.12  # max |log| of the width/height stretch
    shift: float = 0.12  # max shift, share of the side
    rotate: float = 8.0  # max degrees
    flip: bool = True
    gain: tuple[float, float] = (0.7, 1.3)  # per channel, about the backdrop value
    blur_p: float = 0.25
    noise: float = 6.0  # max sigma, uint8 steps
    erase_p: float = 0.25

    def photo(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, h, w, c = x.shape
        dev = x.device

        def u(lo: float, hi: float, size=(n,)) -> torch.Tensor:
            return (torch.rand(size, generator=g, device=dev) * (hi - lo) + lo) if hi > lo else torch.full(size, lo, device=dev)

        xf = x.permute(0, 3, 1, 2).float()
        base = torch.tensor(self.pad_value if self.pad_value else [0] * c, dtype=torch.float32, device=dev)
        base = base[:c].view(1, c, 1, 1)
        s = torch.exp(u(math.log(self.scale[0]), math.log(self.scale[1])))
        a = torch.exp(u(-self.aspect, self.aspect))
        sx, sy = s * a.sqrt(), s / a.sqrt()
        r = u(-self.rotate, self.rotate) * math.pi / 180
        flip = (torch.rand(n, generator=g, device=dev) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool, device=dev)
        fx = torch.where(flip, -1.0, 1.0)
        cos, sin = torch.cos(r), torch.sin(r)
        theta = torch.zeros(n, 2, 3, device=dev)
        # input coordinates = A @ output coordinates + t (normalised [-1, 1]): zooming out divides by s
        theta[:, 0, 0], theta[:, 0, 1] = fx * cos / sx, -sin / sx
        theta[:, 1, 0], theta[:, 1, 1] = fx * sin / sy, cos / sy
        theta[:, 0, 2] = u(-2 * self.shift, 2 * self.shift)
        theta[:, 1, 2] = u(-2 * self.shift, 2 * self.shift)
        grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
        mode = "zeros" if self.pad_value else "border"
        out = F.grid_sample(xf - base, grid, mode="bilinear", padding_mode=mode, align_corners=False)
        out = out * u(*self.gain, size=(n, c)).view(n, c, 1, 1)
        if self.blur_p > 0:
            k = torch.tensor([0.25, 0.5, 0.25], device=dev)
            blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(c, 1, 3, 3),
                               groups=c)
            pick = (torch.rand(n, generator=g, device=dev) < self.blur_p).view(n, 1, 1, 1)
            out = torch.where(pick, blurred, out)
        if self.noise > 0:
            sigma = u(0, self.noise).view(n, 1, 1, 1)
            out = out + sigma * torch.randn(out.shape, generator=g, device=dev)
        out = (out + base).round_().clamp_(0, 255).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous()

    def erase(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return Augment(pad=0, flip=False, erase_p=self.erase_p).erase(x, g)


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
