"""The public multi-scale deformable attention entry point and its choice of implementation."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from detrkit.ops._extension import load_extension
from detrkit.ops._validation import check_ms_deform_attn_inputs
from detrkit.ops.ms_deform_attn_fused import ms_deform_attn_forward
from detrkit.ops.ms_deform_attn_portable import ms_deform_attn_portable
from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference

Implementation = Literal["auto", "reference", "cpu", "portable"]

FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# Treated as a constant under torch.compile / export, so that tracing never enters the build.
@torch.compiler.assume_constant_result
def fused_kernel_available() -> bool:
    """Whether the fused CPU kernel is built and loadable (builds it on the first call)."""
    return load_extension() is not None


def auto_implementation(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Literal["reference", "cpu"]:
    """The implementation that ``implementation="auto"`` picks for inputs on ``device``."""
    if (
        torch.device(device).type == "cpu"
        and dtype in FUSED_CPU_DTYPES
        and fused_kernel_available()
    ):
        return "cpu"
    return "reference"


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    implementation: Implementation = "auto",
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, eq. 3).

    Args:
        value: ``[N, S, M, D]``, the L levels flattened row-major and concatenated along S.
        spatial_shapes: int64 ``[L, 2]``, (H, W) of each level.
        level_start_index: int64 ``[L]``, exclusive cumsum of H * W.
        sampling_locations: ``[N, Lq, M, L, P, 2]``, (x, y) normalised to [0, 1] per level;
            points off the map read zeros (bilinear, like grid_sample with align_corners=False).
        attention_weights: ``[N, Lq, M, L, P]``.
        implementation: ``"auto"`` (fused kernel when it applies, else reference),
            ``"reference"`` (grid_sample), ``"cpu"`` (fused CPU kernel) or ``"portable"``
            (gathers with the level sizes kept as tensors, for ONNX export).

    Returns:
        ``[N, Lq, M * D]``, differentiable with respect to value, sampling_locations and
        attention_weights.
    """
    check_ms_deform_attn_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if implementation == "auto":
        implementation = auto_implementation(value.device, value.dtype)
    if implementation == "reference":
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if implementation == "portable":
        return ms_deform_attn_portable(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    if implementation != "cpu":
        raise ValueError(
            "implementation must be 'auto', 'reference', 'cpu' or 'portable', "
            f"got {implementation!r}"
        )
    if value.device.type != "cpu" or value.dtype not in FUSED_CPU_DTYPES:
        raise ValueError(
            "implementation='cpu' needs CPU tensors of dtype float32, float64, bfloat16 or "
            f"float16, got value on {value.device} with dtype {value.dtype}"
        )
    if not fused_kernel_available():
        raise RuntimeError("implementation='cpu' requested but the fused kernel could not be built")
    return ms_deform_attn_forward(
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )
