"""Multi-scale deformable attention that computes its own sampling points, for CPU inference.

Deformable DETR's attention derives each query's sampling points from the query itself: one
linear projection gives the offsets ``[M, L, P, 2]`` and the attention logits ``[M, L * P]``, and
then (the reference, ``models/deformable_attention.py``)

    attention_weights  = softmax(logits) over each head's L * P points
    sampling_locations = reference_points + offsets / (W, H) of each level

As separate operators these are passes over the queries' points in memory (a softmax, an
``addcdiv``, conversions); :func:`ms_deform_attn_projected` does them inside the fused CPU kernel,
query by query, as it samples. Inference only: it has no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.ops._extension import required_extension
from detrkit.ops._validation import coordinate_dtype_for
from detrkit.ops.dispatch import chosen_implementation, fused_kernel_available


def projected_kernel_applies(value: Tensor, reference_points: Tensor, projection: Tensor) -> bool:
    """Whether :func:`ms_deform_attn_projected` runs for these inputs (shapes aside): CPU
    tensors, points around 2-d reference points (not boxes) in the values' accumulation dtype
    (fp32 for bf16), no gradient wanted, not compiling, tracing or exporting, the attention
    implementation left to "auto" or set to "cpu", and the fused kernel built."""
    tensors = (value, reference_points, projection)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    recording = (
        torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    )
    return (
        all(t.device.type == "cpu" for t in tensors)
        and reference_points.shape[-1] == 2
        and reference_points.dtype == coordinate_dtype_for(value.dtype)
        and projection.dtype == value.dtype
        and not wants_grad
        and not recording
        and chosen_implementation() in ("auto", "cpu")
        and fused_kernel_available()
    )


def ms_deform_attn_projected(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    reference_points: Tensor,
    projection: Tensor,
) -> Tensor:
    """``ms_deform_attn`` with the sampling points computed from the queries' projection.

    Args:
        value: ``[N, S, M, D]``, as for :func:`~detrkit.ops.ms_deform_attn`.
        spatial_shapes: int64 ``[L, 2]``, (H, W) of each level.
        level_start_index: int64 ``[L]``, exclusive cumsum of H * W.
        reference_points: ``[N, Lq, L, 2]`` normalised (x, y), in the values' accumulation dtype
            (fp32 for bf16 and fp16 values).
        projection: ``[N, Lq, M * L * P * 3]`` in value's dtype: each query's sampling offsets
            ``[M, L, P, 2]`` in pixels of their level, then its attention logits ``[M, L * P]``.

    Returns:
        ``[N, Lq, M * D]`` in value's dtype: the attention with
        ``attention_weights = softmax(logits)`` over each head's points and
        ``sampling_locations = reference_points + offsets / (W, H)``, computed in the
        accumulation dtype. No gradient.
    """
    for name, levels in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
    ):
        if levels.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {levels.dtype}")
    kernels = required_extension("ms_deform_attn")
    return kernels.projected_forward(
        value, spatial_shapes, level_start_index, reference_points, projection
    )
