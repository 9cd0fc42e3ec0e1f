"""Builds and loads detrkit's C++ CPU kernels (multi-scale deformable attention, dropout,
Winograd convolution transforms, max pooling, a residual addition with its LayerNorm, bf16
attention) on first use, compiled once per machine and cached."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [
    _CSRC / name
    for name in (
        "ms_deform_attn_cpu.cpp",
        "dropout_cpu.cpp",
        "winograd_cpu.cpp",
        "max_pool_cpu.cpp",
        "layer_norm_cpu.cpp",
        "attention_cpu.cpp",
        "image_layout_cpu.cpp",
        "bindings.cpp",
    )
]
_HEADERS = [_CSRC / name for name in ("kernels.h", "ms_deform_attn_sampling.h", "vector_lanes.h")]


def cpu_description() -> str:
    """This CPU's architecture, model and feature flags, for the keys of builds made with
    ``-march=native`` (a shared home directory can expose a cache to other machines)."""
    description = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                description += line
    except OSError:
        pass
    return description


def _build_key() -> str:
    """A short hash of what the compiled kernels depend on: this CPU's model and feature flags,
    the kernels' sources, and the torch and Python they are built against (and where that torch
    lives, so that two environments on one machine keep a build each instead of rebuilding over
    each other's).

    The kernels are built with ``-march=native`` in a per-user cache that a shared home directory
    can expose to other machines; keying the build on the CPU keeps one from loading a binary
    that uses instructions it lacks.
    """
    import torch

    description = cpu_description()
    description += f"{torch.__version__} {torch.__file__} {sys.version}"
    digest = hashlib.sha256(description.encode())
    for source in _SOURCES + _HEADERS:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def _is_built(name: str, cpp_extension: ModuleType) -> bool:
    """Whether the kernels of ``name`` are in torch's extension cache already (False when that
    cannot be told)."""
    try:
        directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper of torch's: absent, it only costs the notice
        return False
    return any(directory.glob(f"{name}*.so"))


def _build() -> ModuleType:
    # cpp_extension logs a CUDA_HOME notice on import on machines without a GPU; this build is
    # CPU-only, so it is noise here.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    previous_level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        cpp_logger.setLevel(previous_level)

    name = f"detrkit_cpu_kernels_{_build_key()}"
    if not _is_built(name, cpp_extension):
        print(
            "detrkit: compiling the fused CPU kernels (once per machine and environment, about "
            "30 s)...",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=name,
        sources=[str(source) for source in _SOURCES],
        # -fopenmp is required: at::parallel_for is a header template that otherwise compiles
        # to a serial loop inside an extension.
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled kernels' module, or ``None`` (after one warning) when it cannot be built."""
    try:
        return _build()
    except Exception as error:  # any build failure (no compiler, no ninja, ...) falls back
        # The first line names the failure; what follows is the full compiler log.
        message = str(error).strip()
        first_line = message.splitlines()[0] if message else ""
        reason = type(error).__name__ + (f": {first_line[:300]}" if first_line else "")
        warnings.warn(
            "detrkit: the fused CPU kernels (ms_deform_attn, dropout, Winograd, max pooling, "
            f"LayerNorm, attention) could not be built ({reason}); falling back to PyTorch's own "
            "operators (much slower for ms_deform_attn and dropout).",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def required_extension(operator: str) -> ModuleType:
    """The compiled kernels' module for ``operator``'s fused kernel; raises when it is not built."""
    extension = load_extension()
    if extension is None:
        raise RuntimeError(f"the fused {operator} CPU kernel is not available on this machine")
    return extension
