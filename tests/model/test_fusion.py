"""Serving folds batch norms into convolutions (``model.predictor.fuse_for_inference``): the same predictions.

For the shipped checkpoints, the fused network's logits match the network as trained (eval mode) within
1e-4 on real inputs, the primary labels are the same, and the backbone really was rewritten (a GraphModule
without BatchNorm layers), so the speed-up is not silently lost.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.predictor import Predictor, load_model
from model.weights import DEFAULT_CHECKPOINT, PHOTO_CHECKPOINT


@pytest.mark.parametrize("path", [DEFAULT_CHECKPOINT, PHOTO_CHECKPOINT], ids=lambda p: p.name)
def test_fused_network_predicts_as_trained(path):
    plain, *_ = load_model(path, "cpu")  # as trained, eval mode, not fused
    p = Predictor.from_checkpoint(path, device="cpu")
    assert type(p.model.backbone).__name__ == "GraphModule"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in p.model.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.backbone.modules())

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, p.input_size, p.input_size, p.channels), dtype=np.uint8)
    xin = p.input_tensor(x)
    with torch.inference_mode():
        c0, f0 = plain(xin.contiguous())
        c1, f1 = p.model(xin)
    assert torch.allclose(c0, c1, atol=1e-4) and torch.allclose(f0, f1, atol=1e-4)
    assert torch.equal(f0.argmax(1), f1.argmax(1)) and torch.equal(c0.argmax(1), c1.argmax(1))
