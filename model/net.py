"""The hierarchical network: a shared backbone, a coarse head and a gated fine head.

    f        = pool(backbone(x))
    coarse   = W_c f
    fine     = W_f (f * gate(f)),   gate = Linear -> ReLU -> Linear -> Sigmoid
    fine     = W_f f                 (``gate=False``: the ablation without the gate; metadata "gate": false)

This is the seed's design kept recognisable; hierarchy consistency is added at decoding time
(``model.consistency``) and, for multi-label taxonomies, by the max-constraint loss (``model.losses``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import PretrainedUnavailable, UnknownBackbone

BackboneFactory = Callable[[int, bool], tuple[nn.Module, int]]
BACKBONES: dict[str, BackboneFactory] = {}
# Smallest input side (px) each backbone handles; the tests and the CLI use it.
MIN_INPUT_SIZE: dict[str, int] = {}


def register_backbone(name: str, min_size: int = 32) -> Callable[[BackboneFactory], BackboneFactory]:
    def deco(fn: BackboneFactory) -> BackboneFactory:
        BACKBONES[name] = fn
        MIN_INPUT_SIZE[name] = min_size
        return fn

    return deco


def build_backbone(name: str, channels: int = 3, pretrained: bool | str | None = False) -> tuple[nn.Module, int]:
    """Return (module mapping (N, C, H, W) -> pooled features (N, D), D). ``pretrained``: False / None / "" for
    random weights, True or ``"imagenet"`` for torchvision's own weights (its weights API and cache,
    ``TORCH_HOME``; downloaded once where there is a network), or a path to a local weights file."""
    if name not in BACKBONES:
        raise UnknownBackbone(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    source = _pretrained_source(pretrained)
    if source is None or source == "imagenet":
        return BACKBONES[name](channels, source == "imagenet")
    body, dim = BACKBONES[name](channels, False)
    load_backbone_file(body, source)
    return body, dim


def _pretrained_source(pretrained: bool | str | None) -> str | None:
    if pretrained is None or pretrained is False or pretrained == "":
        return None
    if pretrained is True or str(pretrained).lower() == "imagenet":
        return "imagenet"
    return str(pretrained)


def check_pretrained(name: str, pretrained: bool | str = True) -> None:
    """Fail early (before loading data) when ``--pretrained`` cannot be honoured: an unknown or non-torchvision
    backbone for ``imagenet``, a missing local file."""
    if name not in BACKBONES:
        raise UnknownBackbone(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    source = _pretrained_source(pretrained)
    if source == "imagenet" and name not in TORCHVISION_BACKBONES:
        raise PretrainedUnavailable(f"backbone {name!r} has no ImageNet weights; drop --pretrained or pass a "
                                    "weights file (--pretrained PATH)")
    if source not in (None, "imagenet") and not Path(source).is_file():
        raise PretrainedUnavailable(f"pretrained weights file {source} not found")
    if source == "imagenet":
        # torchvision's weights API: from the cache (TORCH_HOME), downloaded once where there is a network;
        # a machine without either is told so now, not after its dataset has been decoded
        BACKBONES[name](3, True)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A weights file as a flat dict: safetensors (never unpickled), or a torch file read with
    ``weights_only=True`` (tensors only, what torchvision ships)."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line for the user
        raise PretrainedUnavailable(f"cannot read weights file {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedUnavailable(f"weights file {path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def adapt_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], rule: str = "sum") -> tuple[dict, list[str]]:
    """The tensors of ``state`` that fit ``own`` (same name and shape); a first convolution with other input
    channels is adapted (1 -> 3: ``rule`` "first" puts the grey filters on channel 0 and zeros elsewhere,
    "mean" repeats them / 3; 3 -> 1: summed over RGB). Returns (loadable, skipped names)."""
    out, skipped = {}, []
    for k, v in state.items():
        if k not in own:
            skipped.append(k)
            continue
        want = own[k]
        if want.shape == v.shape:
            out[k] = v.to(want.dtype)
        elif v.ndim == 4 and want.ndim == 4 and v.shape[0] == want.shape[0] and v.shape[2:] == want.shape[2:]:
            if v.shape[1] == 1 and want.shape[1] == 3:
                out[k] = (torch.cat([v, torch.zeros_like(v), torch.zeros_like(v)], 1) if rule == "first"
                          else v.repeat(1, 3, 1, 1) / 3).to(want.dtype)
            elif v.shape[1] == 3 and want.shape[1] == 1:
                out[k] = v.sum(1, keepdim=True).to(want.dtype)
            else:
                skipped.append(k)
        else:
            skipped.append(k)
    return out, skipped


def load_backbone_file(body: nn.Module, path: str, rule: str = "sum") -> int:
    """Load a local weights file into a backbone: torchvision-style keys, or a styletag checkpoint's
    ``backbone.*`` tensors. Returns how many tensors were loaded; none is an error."""
    state = _read_weights(path)
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    loadable, _ = adapt_state(body.state_dict(), state, rule)
    if not loadable:
        raise PretrainedUnavailable(f"weights file {path} has no tensor that fits this backbone")
    body.load_state_dict(loadable, strict=False)
    return len(loadable)


# --------------------------------------------------------------------------- small-input ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A compact ResNet for 28-64 px inputs: 3x3 stem, no max-pool, three stages, global average pool."""

    def __init__(self, channels: int = 1, widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (2, 2, 2),
                 zero_init_residual: bool = False):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for j in range(d):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as identity; slows early learning on short schedules
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise PretrainedUnavailable(f"backbone {name!r} has no pretrained weights; drop --pretrained")


@register_backbone("resnet-small", min_size=8)
def _resnet_small(channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    _no_pretrained("resnet-small", pretrained)
    m = SmallResNet(channels, (32, 64, 128), (1, 2, 2))
    return m, m.out_features


@register_backbone("resnet-wide", min_size=8)
def _resnet_wide(channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    """Twice the width and one more block than resnet-small (2.8 M parameters, 11 MB): for a GPU budget."""
    _no_pretrained("resnet-wide", pretrained)
    m = SmallResNet(channels, (64, 128, 256), (2, 2, 2))
    return m, m.out_features


@register_backbone("resnet-tiny", min_size=8)
def _resnet_tiny(channels: int, pretrained: bool) -> tuple[nn.Module, int]:
    _no_pretrained("resnet-tiny", pretrained)
    m = SmallResNet(channels, (16, 32, 64), (1, 1, 1))
    return m, m.out_features


# --------------------------------------------------------------------------- torchvision backbones


def _tv_weights(name: str, pretrained: bool):
    """torchvision's default weights for ``name`` through its weights API: the builder reads them from the
    cache (``TORCH_HOME``/hub/checkpoints, under torchvision's own file name) or downloads them once."""
    if not pretrained:
        return None
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def _build_tv(name: str, pretrained: bool):
    import torchvision.models as tvm

    weights = _tv_weights(name, pretrained)
    try:
        return getattr(tvm, name)(weights=weights)
    except Exception as exc:  # noqa: BLE001 - no network (URLError), a bad cached file (UnpicklingError, ...)
        if weights is None:
            raise
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise PretrainedUnavailable(
            f"cannot load ImageNet weights for {name} ({str(exc).splitlines()[0][:160]}); with no network, put "
            f"{Path(weights.url).name} into {cached.parent} (TORCH_HOME) or pass --pretrained PATH"
        ) from None


def _adapt_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """Swap a 3-channel first conv for a ``channels``-input one; grey weights = sum over RGB."""
    if channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class _Pooled(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(name: str):
    def factory(channels: int, pretrained: bool) -> tuple[nn.Module, int]:
        m = _build_tv(name, pretrained)
        m.conv1 = _adapt_conv(m.conv1, channels)
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return m, dim

    return factory


def _features_model(name: str, norm_from_classifier: bool = False):
    def factory(channels: int, pretrained: bool) -> tuple[nn.Module, int]:
        m = _build_tv(name, pretrained)
        first = m.features[0][0]
        m.features[0][0] = _adapt_conv(first, channels)
        if norm_from_classifier:  # convnext: LayerNorm2d + Flatten live in the classifier
            head = nn.Sequential(m.avgpool, m.classifier[0], m.classifier[1])
            dim = m.classifier[2].in_features
        else:
            head = nn.Sequential(m.avgpool, nn.Flatten(1))
            dim = next(x for x in m.classifier if isinstance(x, nn.Linear)).in_features
        return _Pooled(m.features, head), dim

    return factory


TORCHVISION_BACKBONES = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                         "convnext_tiny")
register_backbone("resnet18", 32)(_resnet("resnet18"))
register_backbone("resnet50", 32)(_resnet("resnet50"))
register_backbone("mobilenet_v3_small", 32)(_features_model("mobilenet_v3_small"))
register_backbone("mobilenet_v3_large", 32)(_features_model("mobilenet_v3_large"))
register_backbone("efficientnet_b0", 32)(_features_model("efficientnet_b0"))
register_backbone("convnext_tiny", 32)(_features_model("convnext_tiny", norm_from_classifier=True))


# --------------------------------------------------------------------------- heads


class Gate(nn.Module):
    """gate(f) = sigmoid(W2 relu(W1 f)): a per-feature attention in [0, 1] for the fine head."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(dim // 4, 8)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim), nn.Sigmoid())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class HierarchicalNet(nn.Module):
    """Backbone -> f; coarse logits = Linear(f); fine logits = Linear(f * gate(f)), or Linear(f) with
    ``gate=False`` (no ``gate`` module, no ``gate.*`` tensors; the other parameter names are the same)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, n_coarse: int, n_fine: int, dropout: float = 0.0,
                 gate: bool = True):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.coarse_head = nn.Linear(feat_dim, n_coarse)
        self.gate = Gate(feat_dim) if gate else None
        self.fine_head = nn.Linear(feat_dim, n_fine)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        f = self.dropout(f)
        return self.coarse_head(f), self.fine_head(f if self.gate is None else f * self.gate(f))


def pick_device(device: str | None) -> torch.device:
    """``device`` as given, else the GPU when there is one."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(
    backbone: str, n_coarse: int, n_fine: int, channels: int = 3, pretrained: bool | str | None = False,
    dropout: float = 0.0, gate: bool = True,
) -> HierarchicalNet:
    """``gate=False``: the fine head reads the features directly (the gate ablated)."""
    body, dim = build_backbone(backbone, channels, pretrained)
    return HierarchicalNet(body, dim, n_coarse, n_fine, dropout, gate)
