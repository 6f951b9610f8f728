import pytest
import torch

from model.errors import PretrainedUnavailable, UnknownBackbone
from model.net import BACKBONES, MIN_INPUT_SIZE, Gate, build_backbone, build_model

REQUIRED = {"resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "resnet-small"}


def test_registry_has_required_backbones():
    assert REQUIRED <= set(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_shape_no_nan(name):
    size = MIN_INPUT_SIZE[name] if MIN_INPUT_SIZE[name] >= 28 else 28
    model = build_model(name, n_coarse=6, n_fine=10, channels=1).train()  # train mode: BN over the batch
    c, f = model(torch.randn(2, 1, size, size))
    assert c.shape == (2, 6) and f.shape == (2, 10)
    assert torch.isfinite(c).all() and torch.isfinite(f).all()
    c.sum().backward()  # gradients flow through the backbone


def test_three_channel_input():
    model = build_model("resnet18", 4, 7, channels=3).eval()
    c, f = model(torch.randn(2, 3, 32, 32))
    assert c.shape == (2, 4) and f.shape == (2, 7)


def test_gate_is_linear_relu_linear_sigmoid():
    g = Gate(32)
    kinds = [type(m).__name__ for m in g.net]
    assert kinds == ["Linear", "ReLU", "Linear", "Sigmoid"]
    out = g(torch.randn(5, 32) * 100)
    assert ((out >= 0) & (out <= 1)).all()


def test_fine_head_sees_gated_features():
    model = build_model("resnet-tiny", 2, 3, channels=1).eval()
    with torch.no_grad():
        model.gate.net[2].weight.zero_()
        model.gate.net[2].bias.fill_(-1e4)  # gate closed -> fine logits = fine bias only
        _, f = model(torch.randn(3, 1, 28, 28))
    assert torch.allclose(f, model.fine_head.bias.expand(3, -1))


def test_pretrained_without_local_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedUnavailable, match="not in the local cache"):
        build_backbone("resnet18", 1, pretrained=True)
    with pytest.raises(PretrainedUnavailable, match="no pretrained weights"):
        build_backbone("resnet-small", 1, pretrained=True)


def test_unknown_backbone():
    with pytest.raises(UnknownBackbone, match="unknown backbone 'vgg1'"):
        build_backbone("vgg1")
