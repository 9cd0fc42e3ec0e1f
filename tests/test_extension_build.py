"""The C++ kernels' build cache: keyed on what the binary depends on, announced when it compiles."""

from __future__ import annotations

import shutil

import pytest
import torch

from detrkit.ops import _extension


def test_the_build_key_follows_sources_torch_and_environment(tmp_path, monkeypatch):
    copies = []
    for source in _extension._SOURCES:
        copies.append(tmp_path / source.name)
        shutil.copy(source, copies[-1])
    monkeypatch.setattr(_extension, "_SOURCES", copies)
    key = _extension._build_key()
    assert key == _extension._build_key()  # the same inputs, the same build
    copies[0].write_text(copies[0].read_text() + "\n// changed\n")
    edited = _extension._build_key()
    assert edited != key
    # A second environment on the same machine (another venv's torch) keeps a build of its own.
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/torch/__init__.py")
    assert _extension._build_key() not in (key, edited)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert len({key, edited, _extension._build_key()}) == 3


def test_compiling_is_announced_only_when_the_build_is_missing(capsys, monkeypatch):
    from torch.utils import cpp_extension

    if _extension.load_extension() is None:
        pytest.skip("no compiler here: the kernels fall back to PyTorch's operators")
    name = f"detrkit_cpu_kernels_{_extension._build_key()}"
    assert _extension._is_built(name, cpp_extension)
    assert not _extension._is_built(name + "_never_built", cpp_extension)

    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: loaded.append(kwargs["name"]))
    capsys.readouterr()
    _extension._build()  # built already: loaded without a word
    assert loaded == [name] and capsys.readouterr().err == ""
    monkeypatch.setattr(_extension, "_build_key", lambda: "not_built_yet")
    _extension._build()
    assert "compiling the fused CPU kernels" in capsys.readouterr().err
