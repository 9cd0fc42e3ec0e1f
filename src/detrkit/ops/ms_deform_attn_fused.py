"""The fused CPU kernel as ``torch.library`` custom ops, so that autograd, ``torch.compile`` and
``torch.export`` see one opaque op with a known output shape instead of Python internals."""

from __future__ import annotations

import torch
from torch import Tensor

from detrkit.ops._extension import required_extension


def _kernel():
    return required_extension("ms_deform_attn")


@torch.library.custom_op("detrkit::ms_deform_attn_forward", mutates_args=(), device_types="cpu")
def ms_deform_attn_forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused forward; shapes as in :func:`detrkit.ops.ms_deform_attn`, returns ``[N, Lq, M * D]``."""
    return _kernel().forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@ms_deform_attn_forward.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("detrkit::ms_deform_attn_backward", mutates_args=(), device_types="cpu")
def ms_deform_attn_backward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    grad_output: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward: ``(grad_value, grad_sampling_locations, grad_attention_weights)``."""
    return tuple(
        _kernel().backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output,
        )
    )


@ms_deform_attn_backward.register_fake
def _backward_fake(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_sampling_locations, grad_attention_weights = ms_deform_attn_backward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output.contiguous(),
    )
    # spatial_shapes and level_start_index are integer metadata: no gradient.
    return grad_value, None, None, grad_sampling_locations, grad_attention_weights


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)
