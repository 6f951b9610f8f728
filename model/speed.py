"""CPU/GPU inference throughput of a checkpoint through ``Predictor.predict`` (the worker's path).

    python -m model.speed --checkpoint model/weights/fmnist-resnet-small.safetensors --batch-size 256
"""

from __future__ import annotations

import json
import time

import click
import numpy as np
import torch

from .predictor import Predictor
from .weights import DEFAULT_CHECKPOINT


def measure(predictor: Predictor, batch_size: int = 256, batches: int = 20, warmup: int = 3) -> dict:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, predictor.input_size, predictor.input_size, predictor.channels), np.uint8)
    for _ in range(warmup):
        predictor.predict(x)
    t0 = time.perf_counter()
    for _ in range(batches):
        predictor.predict(x)
    dt = time.perf_counter() - t0
    return {"images_per_s": batch_size * batches / dt, "batch_size": batch_size, "batches": batches,
            "threads": torch.get_num_threads(), "device": str(predictor.device)}


@click.command()
@click.option("--checkpoint", default=str(DEFAULT_CHECKPOINT), show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--batches", type=int, default=20, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--device", default="cpu", show_default=True)
def main(checkpoint, batch_size, batches, threads, device):
    if threads:
        torch.set_num_threads(threads)
    p = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
    click.echo(json.dumps({"checkpoint": checkpoint, "model_version": p.model_version, **measure(p, batch_size, batches)}))


if __name__ == "__main__":
    main()
