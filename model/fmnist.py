"""Read Fashion-MNIST IDX files (as Debian's ``dataset-fashion-mnist`` installs them). numpy only."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .errors import DatasetMissing

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Index i of the dataset's labels is fine label i of the fashion-mnist taxonomy.
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


class FashionMNISTMissing(DatasetMissing, FileNotFoundError):
    """The IDX files are not there; the message names the Debian package."""


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FashionMNISTMissing(
        f"Fashion-MNIST file {path.name}[.gz] not found in {path.parent}; "
        "install it with 'apt-get install -y dataset-fashion-mnist' or pass --source DIR"
    )


def read_idx(path: Path) -> np.ndarray:
    with _open(path) as fh:
        zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(shape))} bytes)")
    return data.reshape(shape)


def load_split(split: str, source: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N, 28, 28], labels uint8 [N]) of ``train`` or ``test``."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    src = Path(source) if source else DEFAULT_SOURCE
    images_name, labels_name = SPLIT_FILES[split]
    return read_idx(src / images_name), read_idx(src / labels_name)
