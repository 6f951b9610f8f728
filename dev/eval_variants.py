"""Decoding and test-time-augmentation variants of trained checkpoints on the Fashion-MNIST test split
(the "what we tried for coarse accuracy" table in docs/model.md).

    python dev/eval_variants.py model/weights/fmnist-resnet-small.safetensors model/weights/fmnist-resnet-wide.safetensors

For each checkpoint: fine / coarse top-1 plain and with horizontal-flip TTA (mean logits), and coarse from
the coarse head alone, from the sum of the fine probabilities, and from their product; then the ensemble
of all checkpoints given (mean logits, with and without TTA).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.cli import load_dataset
from model.data import ArraySet
from model.evaluate import collect_logits, compute_metrics, summary
from model.predictor import load_model


def mean_logits(runs: list[dict]) -> dict:
    return {k: sum(r[k] for r in runs) / len(runs) if "logits" in k else runs[0][k] for k in runs[0]}


def main(paths: list[str]) -> None:
    all_runs, tax = {}, None
    for path in paths:
        model, meta, tax, dev = load_model(path, "cpu")
        test = load_dataset("fmnist", "test", tax)
        kw = dict(mean=meta["mean"], std=meta["std"], input_size=meta["input_size"], batch_size=500, device=dev,
                  channels=int(meta["channels"]))
        plain = collect_logits(model, test, **kw)
        flipped = collect_logits(model, ArraySet(test.images[:, :, ::-1].copy(), test.coarse, test.fine), **kw)
        all_runs[path] = (plain, flipped)
        parent = torch.tensor([p[0] for p in tax.parents])
        to_coarse = torch.zeros(len(tax.fine.labels), len(tax.coarse.labels))
        to_coarse[torch.arange(len(parent)), parent] = 1
        for label, d in (("plain", plain), ("flip-TTA", mean_logits([plain, flipped]))):
            m = summary(compute_metrics(tax, d))
            c = torch.from_numpy(d["coarse_logits"]).softmax(1)
            f = torch.from_numpy(d["fine_logits"]).softmax(1)
            ct = torch.from_numpy(d["coarse_t"])
            acc = {name: float((x.argmax(1) == ct).float().mean()) for name, x in
                   (("head", c), ("sum-of-fine", f @ to_coarse), ("product", c * (f @ to_coarse)))}
            print(f"{Path(path).name} {label}: fine {m['fine_top1']:.4f} coarse {m['coarse_top1']:.4f} | coarse by "
                  + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()), flush=True)
    if len(all_runs) > 1:
        for label, runs in (("plain", [p for p, _ in all_runs.values()]),
                            ("flip-TTA", [x for pair in all_runs.values() for x in pair])):
            m = summary(compute_metrics(tax, mean_logits(runs)))
            print(f"ensemble of {len(all_runs)} {label}: fine {m['fine_top1']:.4f} coarse {m['coarse_top1']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
