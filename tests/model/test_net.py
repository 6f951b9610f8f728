from pathlib import Path

import pytest
import torch

from model.errors import PretrainedUnavailable, UnknownBackbone
from model.net import BACKBONES, MIN_INPUT_SIZE, Gate, build_backbone, build_model, check_pretrained

REQUIRED = {"resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
            "resnet-small"}


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


def _fake_imagenet_cache(tmp_path, monkeypatch, name="resnet18"):
    """torchvision's weights file for ``name``, written where its weights API looks (TORCH_HOME), holding
    random weights we know: the test needs no network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights(name).DEFAULT
    ref = getattr(torchvision.models, name)()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(weights.url).name
    torch.save(ref.state_dict(), target)
    return ref, target


def test_imagenet_weights_load_from_the_torchvision_cache(tmp_path, monkeypatch):
    ref, _ = _fake_imagenet_cache(tmp_path, monkeypatch)
    body, dim = build_backbone("resnet18", 3, pretrained="imagenet")
    assert dim == 512
    assert torch.equal(body.conv1.weight, ref.conv1.weight)
    assert torch.equal(body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    grey, _ = build_backbone("resnet18", 1, pretrained=True)  # RGB filters summed into one channel
    assert torch.allclose(grey.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    fresh, _ = build_backbone("resnet18", 3, pretrained=False)
    assert not torch.equal(fresh.conv1.weight, ref.conv1.weight)


def test_unreadable_cached_weights_and_ours_fail_clearly(tmp_path, monkeypatch):
    _, target = _fake_imagenet_cache(tmp_path, monkeypatch)
    target.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedUnavailable, match="cannot load ImageNet weights for resnet18"):
        build_backbone("resnet18", 1, pretrained="imagenet")
    with pytest.raises(PretrainedUnavailable, match="no pretrained weights"):
        build_backbone("resnet-small", 1, pretrained=True)
    with pytest.raises(PretrainedUnavailable, match="not found"):
        check_pretrained("resnet18", str(tmp_path / "missing.safetensors"))
    with pytest.raises(PretrainedUnavailable, match="has no ImageNet weights"):
        check_pretrained("resnet-small", "imagenet")


def test_pretrained_path_loads_a_local_file(tmp_path):
    from safetensors.torch import save_file

    from model.checkpoint import save_checkpoint
    from model.taxonomy import load_taxonomy

    donor = build_model("resnet-tiny", 6, 10, 1)
    tax = load_taxonomy("fashion-mnist")
    ck = tmp_path / "donor.safetensors"
    save_checkpoint(ck, donor, {"taxonomy": tax.to_dict(), "backbone": "resnet-tiny", "input_size": 28,
                                "channels": 1, "mean": [0.5], "std": [0.5]})
    # a styletag checkpoint: its backbone.* tensors; a grey stem into a 3-channel one is repeated / 3
    m = build_model("resnet-tiny", 3, 4, 3, pretrained=str(ck))
    assert torch.allclose(m.backbone.stages[0].conv1.weight, donor.backbone.stages[0].conv1.weight)
    assert torch.allclose(m.backbone.stem[0].weight, donor.backbone.stem[0].weight.repeat(1, 3, 1, 1) / 3)
    # plain backbone keys in a safetensors file
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in donor.backbone.state_dict().items()}, str(plain))
    m2 = build_model("resnet-tiny", 6, 10, 1, pretrained=str(plain))
    assert torch.equal(m2.backbone.stem[0].weight, donor.backbone.stem[0].weight)
    other = tmp_path / "other.safetensors"
    save_file({"nothing.weight": torch.zeros(2)}, str(other))
    with pytest.raises(PretrainedUnavailable, match="no tensor that fits"):
        build_model("resnet-tiny", 6, 10, 1, pretrained=str(other))


def test_unknown_backbone():
    with pytest.raises(UnknownBackbone, match="unknown backbone 'vgg1'"):
        build_backbone("vgg1")
