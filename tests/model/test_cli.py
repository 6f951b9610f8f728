import json

import pytest
from click.testing import CliRunner

from worker.cli import cli


class _Styletag:
    """``styletag train|eval ...`` through the real command group (its error mapping included)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, args, **kwargs):
        return CliRunner().invoke(cli, [self.name, *args], **kwargs)


train_cmd, eval_cmd = _Styletag("train"), _Styletag("eval")


@pytest.mark.usefixtures("fmnist")
def test_train_then_eval(tmp_path):
    out = tmp_path / "m.safetensors"
    r = train_cmd(["--backbone", "resnet-tiny", "--epochs", "1", "--limit", "256", "--batch-size",
                                       "64", "--val-limit", "100", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "model_version" in r.output
    r = eval_cmd(["--checkpoint", str(out), "--limit", "300", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["n"] == 300 and m["consistency"] == 1.0 and "per_class" in m
    r = eval_cmd(["--checkpoint", str(out), "--limit", "100"])
    assert r.exit_code == 0 and "fine_top1" in r.output


def _one_line_error(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    # torch.hub's own 'Downloading: URL' notice may precede the error (it tried the network)
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith("Downloading: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_user_errors_are_one_line(tmp_path):
    r = eval_cmd(["--checkpoint", str(tmp_path / "none.safetensors")])
    assert "not found" in _one_line_error(r)
    r = train_cmd(["--source", str(tmp_path), "--out", str(tmp_path / "x.safetensors")])
    assert "dataset-fashion-mnist" in _one_line_error(r)
    r = train_cmd(["--backbone", "resnet18", "--pretrained", "--source", str(tmp_path),
                                       "--out", str(tmp_path / "x.safetensors")],
                           env={"TORCH_HOME": str(tmp_path / "hub")})
    line = _one_line_error(r)
    assert "cannot load ImageNet weights for resnet18" in line and "TORCH_HOME" in line
    r = train_cmd(["--backbone", "vgg", "--out", str(tmp_path / "x.safetensors")])
    assert "unknown backbone" in _one_line_error(r)
