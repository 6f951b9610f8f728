"""Small untrained photo checkpoints (random weights, the real format) for serving tests: a photo
``PreprocessSpec`` in the metadata, optionally a temperature, review thresholds and colour tagging."""

from __future__ import annotations

from pathlib import Path

from model.preprocess import PreprocessSpec

# dev/photo_proto.py's design D: the garment cropped out of its backdrop, lab-delta, 28 px
PHOTO_SPEC = PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
                            mean=(0.2860, 0.5, 0.5), std=(0.3530, 0.25, 0.25), margin=0.0)


def photo_checkpoint(path: Path, taxonomy=None, spec: PreprocessSpec | None = PHOTO_SPEC, *,
                     backbone: str = "resnet-tiny", seed: int = 0, **extra) -> str:
    """Save a random-weight model over ``taxonomy`` (default fashion-mnist) whose metadata says ``spec``
    (None: no 'preprocess' key, i.e. the legacy spec of 1 channel at 28 px); ``extra`` metadata keys as
    given (temperature, review_threshold, ood_threshold, colour, frame_rule...). Returns model_version."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.net import build_model
    from model.taxonomy import load_taxonomy

    tax = taxonomy or load_taxonomy("fashion-mnist")
    channels, size = (spec.channels, spec.input_size) if spec is not None else (1, 28)
    torch.manual_seed(seed)
    model = build_model(backbone, len(tax.coarse.labels), len(tax.fine.labels), channels).eval()
    meta = {"taxonomy": tax.to_dict(), "backbone": backbone, "input_size": size, "channels": channels,
            "mean": list(spec.mean) if spec else [0.286], "std": list(spec.std) if spec else [0.353],
            "thresholds": {"coarse": 0.5, "fine": 0.5}, "trained_at": "2030-01-01T00:00:00+00:00",
            "command": "tests/support/photo_model.py", **extra}
    if spec is not None:
        meta.setdefault("preprocess", spec.to_dict())
    return save_checkpoint(path, model, meta)
