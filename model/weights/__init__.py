"""Shipped checkpoints (docs/model.md). ``DEFAULT_CHECKPOINT`` is the Fashion-MNIST model the worker loads by
default: fast on a CPU as on a GPU. ``WIDE_CHECKPOINT`` is the more accurate, 4x heavier option for GPU hosts
(``STYLETAG_MODEL``). ``PHOTO_CHECKPOINT`` is the photo model: colour product photos on a light backdrop
(600-1000 px JPEG), Fashion-MNIST's ten classes, coarse, fine and colour tags, calibrated with a review threshold;
trained with ``styletag train --from-catalog`` on the rendered photo catalogue (docs/model.md, "The photo model")."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-resnet-small.safetensors"
WIDE_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-resnet-wide.safetensors"
PHOTO_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-photo.safetensors"
