"""Shipped checkpoints (docs/model.md). ``DEFAULT_CHECKPOINT`` is the Fashion-MNIST model the worker loads by
default: fast on a CPU as on a GPU. ``WIDE_CHECKPOINT`` is the more accurate, 4x heavier option for GPU hosts
(``STYLETAG_MODEL``)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-resnet-small.safetensors"
WIDE_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-resnet-wide.safetensors"
