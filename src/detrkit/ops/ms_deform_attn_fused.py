"""The fused kernels as ``torch.library`` custom ops, so that autograd, ``torch.compile`` and
``torch.export`` see one opaque op with a known output shape instead of Python internals: the C++
kernel for CPUs and the Triton kernels for GPUs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from detrkit.ops._extension import required_extension

_INPUTS = (
    "Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights"
)


def _define(
    name: str,
    device_type: str,
    forward: Callable[..., Tensor],
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
):
    """The custom op ``detrkit::<name>_forward`` running ``forward`` on ``device_type``, with
    ``detrkit::<name>_backward`` (running ``backward``) as its gradient."""
    forward_op = torch.library.custom_op(
        f"detrkit::{name}_forward",
        forward,
        mutates_args=(),
        device_types=device_type,
        schema=f"({_INPUTS}) -> Tensor",
    )
    backward_op = torch.library.custom_op(
        f"detrkit::{name}_backward",
        backward,
        mutates_args=(),
        device_types=device_type,
        schema=f"({_INPUTS}, Tensor grad_output) -> (Tensor, Tensor, Tensor)",
    )

    @forward_op.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        N, _, M, D = value.shape
        return value.new_empty(N, sampling_locations.shape[1], M * D)

    @backward_op.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad):
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gradient(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = backward_op(
            value, shapes, starts, locations, weights, grad_output.contiguous()
        )
        # spatial_shapes and level_start_index are integer metadata: no gradient.
        return grad_value, None, None, grad_locations, grad_weights

    forward_op.register_autograd(gradient, setup_context=setup_context)
    return forward_op


def _cpu_kernel():
    return required_extension("ms_deform_attn")


def _triton_kernels():
    # Imported on first use: importing Triton costs time, and some torch builds lack it.
    from detrkit.ops import ms_deform_attn_triton

    return ms_deform_attn_triton


# Fused CPU forward; arguments as in detrkit.ops.ms_deform_attn, returns [N, Lq, M * D].
ms_deform_attn_forward = _define(
    "ms_deform_attn",
    "cpu",
    lambda *inputs: _cpu_kernel().forward(*inputs),
    lambda *inputs: tuple(_cpu_kernel().backward(*inputs)),
)

# The same on a GPU, through the Triton kernels.
ms_deform_attn_triton_forward = _define(
    "ms_deform_attn_triton",
    "cuda",
    lambda *inputs: _triton_kernels().forward(*inputs),
    lambda *inputs: _triton_kernels().backward(*inputs),
)
