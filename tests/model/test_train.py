import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint
from model.data import ArraySet, Augment, fmnist_dataset
from model.evaluate import collect_logits, compute_metrics
from model.losses import HierarchicalLoss
from model.train import TrainConfig, lr_at, train


def _set(fm_tax, n=64):
    return fmnist_dataset("train", fm_tax, limit=n)


@pytest.mark.usefixtures("fmnist")
def test_tiny_run_overfits_64_images(fm_tax, tmp_path):
    data = _set(fm_tax)
    cfg = TrainConfig(backbone="resnet-tiny", epochs=60, batch_size=32, lr=1e-2, warmup=0.1, weight_decay=0.0,
                      augment=False, label_smoothing=0.0, out=str(tmp_path / "o.safetensors"), threads=2)
    model, meta = train(cfg, fm_tax, data, data, progress=False, log=lambda s: None)
    assert meta["metrics"]["fine_top1"] == 1.0 and meta["metrics"]["coarse_top1"] == 1.0
    assert meta["train"]["history"][-1]["train_loss"] < meta["train"]["history"][0]["train_loss"] / 10
    assert (tmp_path / "o.curves.png").stat().st_size > 1000
    _, saved = load_checkpoint(tmp_path / "o.safetensors")
    assert saved["metrics"] == meta["metrics"] and len(saved["train"]["history"]) == 60


@pytest.mark.usefixtures("fmnist")
def test_resume_matches_uninterrupted_run(fm_tax, tmp_path):
    data = _set(fm_tax, 48)
    common = dict(backbone="resnet-tiny", batch_size=16, lr=2e-3, threads=2, seed=3, epochs=2)
    full = tmp_path / "full.safetensors"
    train(TrainConfig(out=str(full), **common), fm_tax, data, progress=False, log=lambda s: None)
    first = tmp_path / "first.safetensors"
    _stop_after_first_epoch(TrainConfig(out=str(first), **common), fm_tax, data)
    assert load_checkpoint(first)[1]["train"]["epoch"] == 1
    resumed = tmp_path / "resumed.safetensors"
    train(TrainConfig(out=str(resumed), resume=str(first), **common), fm_tax, data, progress=False,
          log=lambda s: None)
    a, meta_a = load_checkpoint(full)
    b, meta_b = load_checkpoint(resumed)
    assert len(meta_b["train"]["history"]) == 2
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    # a warm restart (--init) starts from the weights and records the run it came from
    warm = tmp_path / "warm.safetensors"
    _, meta_w = train(TrainConfig(**{**common, "epochs": 1}, out=str(warm), init=str(full)), fm_tax, data,
                      progress=False, log=lambda s: None)
    assert meta_w["parent"]["model_version"] == meta_a["model_version"]
    assert load_checkpoint(warm)[1]["parent"]["model_version"] == meta_a["model_version"]


def _stop_after_first_epoch(cfg, tax, data):
    """Run ``train`` but abort right after the epoch-1 checkpoint is written (simulates a killed run)."""
    import model.train as T

    real = T.save_optimizer

    class Stop(Exception):
        pass

    def save_then_stop(path, opt):
        real(path, opt)
        raise Stop

    T.save_optimizer = save_then_stop
    try:
        with pytest.raises(Stop):
            train(cfg, tax, data, progress=False, log=lambda s: None)
    finally:
        T.save_optimizer = real


def test_generic_dataset_path(fm_tax):
    """Any Dataset of (uint8 HxWxC, coarse, fine) works, not only ArraySet (the catalog passes its own)."""

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            img = np.full((30, 30, 1), i * 10, np.uint8)  # other size: resized to input_size
            return img, fm_tax.parents[i % 10][0], i % 10

    cfg = TrainConfig(backbone="resnet-tiny", epochs=1, batch_size=8, threads=2)
    model, meta = train(cfg, fm_tax, Items(), Items(), progress=False, log=lambda s: None)
    assert meta["metrics"]["n"] == 20
    logits = collect_logits(model, Items(), mean=cfg.mean, std=cfg.std, input_size=28)
    assert compute_metrics(fm_tax, logits)["consistency"] == 1.0


def test_callable_of_rgb_items(fm_tax):
    """A callable yielding RGB items (as a catalog reader would) is read in and fitted to 1 channel."""

    def items():
        for i in range(12):
            yield np.full((28, 28, 3), 20 * i, np.uint8), fm_tax.parents[i % 10][0], i % 10

    cfg = TrainConfig(backbone="resnet-tiny", epochs=1, batch_size=4, threads=2)
    _, meta = train(cfg, fm_tax, items, items, progress=False, log=lambda s: None)
    assert meta["metrics"]["n"] == 12 and meta["channels"] == 1


def test_augment_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 28, 28, 1), dtype=torch.uint8, generator=g)
    aug = Augment(pad=2)
    y = aug.crop_flip(x, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    z = aug.erase(y.permute(0, 3, 1, 2).float(), g)
    assert z.shape == (16, 1, 28, 28)
    assert (z == 0).float().mean() > (y == 0).float().mean()  # some pixels erased
    assert torch.equal(Augment(pad=0, flip=False).crop_flip(x, g), x)


def test_lr_schedules():
    assert lr_at(0, 100, 1.0, "onecycle", 0.25) == pytest.approx(1 / 25)
    assert lr_at(25, 100, 1.0, "onecycle", 0.25) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, "onecycle", 0.25) == pytest.approx(1e-4)
    assert lr_at(100, 100, 1.0, "cosine", 0.25) == pytest.approx(0.0, abs=1e-9)


def test_losses(fm_tax, ml_tax):
    c, f = torch.randn(4, 6, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    loss, parts = HierarchicalLoss(fm_tax, label_smoothing=0.1)(c, f, torch.tensor([0, 1, 5, 5]), torch.tensor([0, 1, 7, 9]))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"coarse", "fine"}
    assert loss.item() == pytest.approx(parts["coarse"] + parts["fine"], rel=1e-6)
    # w_coarse=0 (the flat ablation) is the fine cross-entropy alone, with the same smoothing
    flat, flat_parts = HierarchicalLoss(fm_tax, w_coarse=0.0, label_smoothing=0.1)(
        c, f, torch.tensor([0, 1, 5, 5]), torch.tensor([0, 1, 7, 9]))
    assert flat.item() == pytest.approx(parts["fine"], rel=1e-6) and flat_parts["coarse"] == 0.0
    assert flat.item() < loss.item()
    c2, f2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 10, requires_grad=True)
    ft = torch.zeros(3, 10)
    ft[0, 0] = ft[1, 4] = ft[2, 9] = 1
    ct = (ft @ torch.tensor(ml_tax.parent_matrix(), dtype=torch.float32)).clamp(0, 1)
    ml, _ = HierarchicalLoss(ml_tax)(c2, f2, ct, ft)
    ml.backward()
    assert torch.isfinite(ml) and c2.grad is not None and torch.isfinite(f2.grad).all()


def test_arrayset_subset():
    s = ArraySet(np.zeros((5, 2, 2, 1), np.uint8), np.zeros(5, np.int64), np.zeros(5, np.int64))
    assert len(s.subset(3)) == 3 and s.subset(None) is s
