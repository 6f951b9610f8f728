"""Shipped checkpoints. ``DEFAULT_CHECKPOINT`` is the Fashion-MNIST model the worker loads by default."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
DEFAULT_CHECKPOINT: Path = WEIGHTS_DIR / "fmnist-resnet-small.safetensors"
