"""The detrkit command line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import detrkit
from detrkit.cli import allocator
from detrkit.cli import main as cli_main
from detrkit.cli.main import main
from helpers import small_detr


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


# Allocates, fills and frees 64 MB eight times with malloc itself and prints the page faults of
# the last four. (torch's own 64-byte-aligned blocks reuse freed memory less predictably: an
# aligned request needs a little more than the block just freed.) The allocator module, which
# needs only the standard library, is loaded from its file: importing the detrkit package would
# import torch, seconds in each of these subprocesses.
_FAULTS_OF_REUSE = """
import ctypes, importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64_000_000)
    ctypes.memset(block, 1, 64_000_000)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[4:]))
"""


def _faults_of_reuse(mode: str, **environment: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_REUSE, mode, allocator.__file__],
        capture_output=True,
        text=True,
        check=True,
        env={**env, **environment},
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_the_program_keeps_freed_memory_for_reuse():
    # By default glibc unmaps a freed 64 MB block, and the next one faults in its pages again.
    applied, default_faults = _faults_of_reuse("default")
    assert default_faults > 0
    applied, faults = _faults_of_reuse("keep")
    assert applied == "True" and faults == 0
    # A user's own malloc settings are left alone; unrelated tunables are not such settings.
    applied, _ = _faults_of_reuse("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    applied, _ = _faults_of_reuse("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert applied == "False"
    applied, _ = _faults_of_reuse("keep", GLIBC_TUNABLES="glibc.cpu.hwcap_mask=0")
    assert applied == "True"


def test_the_console_script_sets_the_allocator_then_runs_main(monkeypatch):
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(cli_main, "main", lambda: calls.append("main") or 0)
    assert cli_main.run() == 0 and calls == ["allocator", "main"]
