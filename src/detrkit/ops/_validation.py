"""Argument checks for ms_deform_attn, raising ValueError that names the offending argument."""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def coordinate_dtype_for(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which sampling locations and attention weights may accompany values of
    ``value_dtype``, besides that dtype itself: float32 for bfloat16 and float16 values."""
    return torch.float32 if value_dtype in LOW_PRECISION else value_dtype


def _check_rank(name: str, tensor: Tensor, rank: int, layout: str) -> None:
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(tensor.shape)}")


def check_ms_deform_attn_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> None:
    """Raises ValueError on any rank, size, dtype or device inconsistency between the inputs."""
    _check_rank("value", value, 4, "[N, S, M, D]")
    _check_rank("spatial_shapes", spatial_shapes, 2, "[L, 2]")
    _check_rank("level_start_index", level_start_index, 1, "[L]")
    _check_rank("sampling_locations", sampling_locations, 6, "[N, Lq, M, L, P, 2]")
    _check_rank("attention_weights", attention_weights, 5, "[N, Lq, M, L, P]")

    if not value.dtype.is_floating_point:
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    coordinate_dtype = sampling_locations.dtype
    if coordinate_dtype not in (value.dtype, coordinate_dtype_for(value.dtype)):
        raise ValueError(
            f"sampling_locations must have value's dtype {value.dtype}"
            + (" or float32" if value.dtype in LOW_PRECISION else "")
            + f", got {coordinate_dtype}"
        )
    if attention_weights.dtype != coordinate_dtype:
        raise ValueError(
            f"attention_weights must have sampling_locations' dtype {coordinate_dtype}, "
            f"got {attention_weights.dtype}"
        )
    for name, tensor in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.device != value.device:
            raise ValueError(
                f"{name} must be on value's device {value.device}, got {tensor.device}"
            )
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
    ):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {tensor.dtype}")

    N, S, M, _ = value.shape
    L = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2] (H, W), got {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != L:
        raise ValueError(
            f"level_start_index must have L={L} entries (one per spatial_shapes row), "
            f"got {level_start_index.shape[0]}"
        )
    if sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must end in 2 (x, y), got {tuple(sampling_locations.shape)}"
        )
    expected = (N, sampling_locations.shape[1], M, L)
    if tuple(sampling_locations.shape[:4]) != expected:
        raise ValueError(
            f"sampling_locations must be [N={N}, Lq, M={M}, L={L}, P, 2] to match value and "
            f"spatial_shapes, got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be [N, Lq, M, L, P] = {tuple(sampling_locations.shape[:-1])} "
            f"to match sampling_locations, got {tuple(attention_weights.shape)}"
        )

    # Reading the level sizes needs concrete values, which traced (fake) tensors do not have;
    # the fused CPU kernel repeats these checks at run time. Off the CPU they are not read at
    # all: on a GPU each read would make the host wait for all queued work, at every layer. The
    # models build them from the feature maps' own sizes, and the Triton kernels read zeros for
    # rows outside value rather than memory past it.
    on_cpu = spatial_shapes.device.type == "cpu" and level_start_index.device.type == "cpu"
    if torch.compiler.is_compiling() or not on_cpu:
        return
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    if bool((spatial_shapes <= 0).any()):
        raise ValueError(f"spatial_shapes must be positive (H, W), got {spatial_shapes.tolist()}")
    if int(areas.sum()) != S:
        raise ValueError(
            f"value has S={S} positions but spatial_shapes {spatial_shapes.tolist()} sum to "
            f"{int(areas.sum())} (S must equal sum of H * W)"
        )
    starts = areas.cumsum(0) - areas
    if not torch.equal(level_start_index.cpu(), starts.cpu()):
        raise ValueError(
            f"level_start_index must be the exclusive cumsum of H * W, {starts.tolist()}, "
            f"got {level_start_index.tolist()}"
        )
