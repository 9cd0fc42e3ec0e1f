"""The public multi-scale deformable attention entry point and its choice of implementation."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from detrkit.ops._extension import load_extension
from detrkit.ops._validation import check_ms_deform_attn_inputs
from detrkit.ops.ms_deform_attn_fused import ms_deform_attn_forward, ms_deform_attn_triton_forward
from detrkit.ops.ms_deform_attn_onnx import ms_deform_attn_onnx
from detrkit.ops.ms_deform_attn_portable import ms_deform_attn_portable
from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference

Implementation = Literal["auto", "reference", "cpu", "triton", "portable", "onnx"]

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# Treated as a constant under torch.compile / export, so that tracing never enters the build.
@torch.compiler.assume_constant_result
def fused_kernel_available() -> bool:
    """Whether the fused CPU kernel is built and loadable (builds it on the first call)."""
    return load_extension() is not None


# Looked up once, at import (finding it imports nothing): torch.compile cannot trace the lookup,
# and on a GPU it runs inside the compiled model.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is installed (it comes with torch's CUDA builds on Linux)."""
    return _TRITON_INSTALLED


@functools.cache
def _gpu_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a GPU of compute capability 8.0 or newer
    (Ampere on), or a CPU with AVX-512 BF16 or AMX. Elsewhere torch emulates bf16, slower than
    float32."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        index = device.index if device.index is not None else torch.cuda.current_device()
        # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated.
        return _gpu_capability(index) >= (8, 0)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def _triton_runs_on(device: torch.device) -> bool:
    """Whether Triton is installed and compiles for this GPU (compute capability 7.0 or newer)."""
    if not triton_available():
        return False
    if torch.compiler.is_compiling():  # inductor needs such a GPU itself
        return True
    if not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_capability(index) >= (7, 0)


def auto_implementation(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Literal["reference", "cpu", "triton"]:
    """The implementation that ``implementation="auto"`` picks for inputs on ``device``."""
    device = torch.device(device)
    if dtype not in FUSED_DTYPES:
        return "reference"
    if device.type == "cpu" and fused_kernel_available():
        return "cpu"
    if device.type == "cuda" and _triton_runs_on(device):
        return "triton"
    return "reference"


# implementation -> (device type, whether it can run, the custom op, what is missing otherwise)
FUSED_KERNELS = {
    "cpu": (
        "cpu",
        fused_kernel_available,
        ms_deform_attn_forward,
        "the fused kernel could not be built",
    ),
    "triton": ("cuda", triton_available, ms_deform_attn_triton_forward, "Triton is not installed"),
}


# The implementation that calls naming none run. A plain global: torch.compile reads it as a
# constant of the graph (with a guard), which a thread-local would not allow.
_chosen: Implementation = "auto"


def chosen_implementation() -> Implementation:
    """The implementation ``ms_deform_attn`` runs when the call names none: "auto" unless an
    :func:`attention_implementation` block says otherwise."""
    return _chosen


@contextlib.contextmanager
def attention_implementation(implementation: Implementation) -> Iterator[None]:
    """Runs every ``ms_deform_attn`` call in the block with ``implementation`` (process-wide);
    the previous choice returns after it.

    >>> with attention_implementation("reference"):
    ...     outputs = model(images, mask)
    """
    global _chosen
    _check_name(implementation)
    previous, _chosen = _chosen, implementation
    try:
        yield
    finally:
        _chosen = previous


def _check_name(implementation: str) -> None:
    if implementation not in ("auto", "reference", "portable", "onnx", *FUSED_KERNELS):
        raise ValueError(
            "implementation must be 'auto', 'reference', 'cpu', 'triton', 'portable' or 'onnx', "
            f"got {implementation!r}"
        )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    implementation: Implementation | None = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3).

    Args:
        value: ``[N, S, M, D]``, the L levels flattened row-major and concatenated along S.
        spatial_shapes: int64 ``[L, 2]``, (H, W) of each level.
        level_start_index: int64 ``[L]``, exclusive cumsum of H * W. Both are checked against
            value only on the CPU: reading them off a GPU would make the host wait for it.
            There, wrong level sizes give wrong results (rows past value read as zeros).
        sampling_locations: ``[N, Lq, M, L, P, 2]``, (x, y) normalised to [0, 1] per level;
            points off the map read zeros (bilinear, like grid_sample with align_corners=False).
        attention_weights: ``[N, Lq, M, L, P]``, in sampling_locations' dtype: value's, or
            float32 with bfloat16 / float16 values (which the fused kernels read as they are
            and the other implementations convert to float32).
        implementation: None (the one :func:`attention_implementation` chose, "auto" by
            default), ``"auto"`` (the fused kernel for the inputs' device when it is
            available, else reference), ``"reference"`` (grid_sample), ``"cpu"`` (fused CPU
            kernel), ``"triton"`` (fused Triton kernels for CUDA tensors), ``"portable"``
            (gathers with the level sizes kept as tensors, for torch.export without the fused
            kernel) or ``"onnx"`` (the reference as one custom op, which ONNX export writes as
            GridSample per level; see :mod:`detrkit.ops.ms_deform_attn_onnx`).

    Returns:
        ``[N, Lq, M * D]`` in value's dtype, differentiable with respect to value,
        sampling_locations and attention_weights.
    """
    # (dtypes first: autocast knows no state for some devices, such as meta)
    if attention_weights.dtype != sampling_locations.dtype and torch.is_autocast_enabled(
        value.device.type
    ):
        # Under autocast the softmaxed weights come out in the autocast dtype while the locations
        # (float32 reference points plus offsets) stay float32; the original's kernel took both
        # in float32 too.
        attention_weights = attention_weights.to(sampling_locations.dtype)
    inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_ms_deform_attn_inputs(*inputs)
    if implementation is None:
        implementation = chosen_implementation()
    _check_name(implementation)
    if implementation == "auto":
        implementation = auto_implementation(value.device, value.dtype)
    if implementation in FUSED_KERNELS:
        device_type, available, kernel, missing = FUSED_KERNELS[implementation]
        if value.device.type != device_type or value.dtype not in FUSED_DTYPES:
            raise ValueError(
                f"implementation={implementation!r} needs {device_type.upper()} tensors of dtype "
                f"float32, float64, bfloat16 or float16, got value on {value.device} with dtype "
                f"{value.dtype}"
            )
        if not available():
            raise RuntimeError(f"implementation={implementation!r} requested but {missing}")
    if implementation == "reference":
        run = ms_deform_attn_reference
    elif implementation == "portable":
        run = ms_deform_attn_portable
    elif implementation == "onnx":
        run = ms_deform_attn_onnx
    else:
        run = functools.partial(_run_fused_kernel, kernel)
    if value.dtype != sampling_locations.dtype and implementation not in FUSED_KERNELS:
        # Only the fused kernels read narrow values with fp32 locations; the others run in fp32.
        return run(value.to(sampling_locations.dtype), *inputs[1:]).to(value.dtype)
    return run(*inputs)


def _run_fused_kernel(
    kernel,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    # The kernels read the level sizes where value is (the reference takes them anywhere).
    inputs = (
        value,
        spatial_shapes.to(value.device),
        level_start_index.to(value.device),
        sampling_locations,
        attention_weights,
    )
    return kernel(*[tensor.contiguous() for tensor in inputs])
