"""The detrkit command line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import detrkit
from conftest import small_detr
from detrkit.cli.main import main


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "detrkit", "models"], capture_output=True, text=True, check=True
    )
    assert "detr_r50_dc5" in result.stdout and "dilation=True" in result.stdout


def test_inspect_and_convert(tmp_path, capsys):
    model = small_detr()
    torch.save({"model": model.state_dict()}, tmp_path / "detr.pth")

    assert main(["inspect", str(tmp_path / "detr.pth")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["num_classes"] == 7 and report["config"]["enc_layers"] == 2
    assert report["parameters"] == sum(p.numel() for p in model.parameters())

    assert main(["convert", str(tmp_path / "detr.pth"), "--out", str(tmp_path / "native")]) == 0
    converted = detrkit.load(tmp_path / "native")
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


def test_bad_checkpoint_is_reported_not_raised(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(tmp_path / "bad.pth")]) == 2
    assert "bad.pth: not a readable PyTorch checkpoint" in capsys.readouterr().err
