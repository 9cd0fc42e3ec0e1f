"""The transformer's MLP in training, ``linear2(dropout(relu(linear1(x))))``, as one operator.

Built from separate operators, every training step allocates four ``[tokens, d_ffn]`` tensors per
layer: linear1's output, the dropout's, and the gradients of both. On a CPU each is fresh memory,
mapped and faulted in page by page (in Deformable DETR's encoder at batch 2 and 512x640, 13,600
tokens x 1024 floats: 56 MB each). As one operator, the ReLU and dropout are written over
linear1's output and the backward pass applies their mask over its own gradient, so two of the
four are never allocated. The arithmetic, and the dropout mask, are those of
:func:`detrkit.ops.relu_dropout` between the two layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.ops.fast_dropout import _draw_seed, _kernel, relu_dropout, uses_fused_kernel


@torch.library.custom_op("detrkit::relu_dropout_mlp", mutates_args=(), device_types="cpu")
def fused_relu_dropout_mlp(
    input: Tensor,
    weight1: Tensor,
    bias1: Tensor,
    weight2: Tensor,
    bias2: Tensor,
    p: float,
    seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(output, hidden)``: the MLP's output ``[..., C_out]`` and the dropout's output
    ``[tokens, d_ffn]``, which the backward pass reads; ``seed`` as in
    :func:`detrkit.ops.fast_dropout.fused_dropout`."""
    tokens = input.reshape(-1, input.shape[-1])  # [T, C]
    hidden = torch.addmm(bias1, tokens, weight1.t())  # [T, d_ffn], fresh
    _kernel().relu_dropout_(hidden, p, int(seed))
    output = torch.addmm(bias2, hidden, weight2.t())  # [T, C_out]
    return output.view(*input.shape[:-1], -1), hidden


@fused_relu_dropout_mlp.register_fake
def _mlp_fake(input, weight1, bias1, weight2, bias2, p, seed):
    tokens = input.numel() // input.shape[-1]
    output = input.new_empty(*input.shape[:-1], weight2.shape[0])
    return output, input.new_empty(tokens, weight1.shape[0])


@torch.library.custom_op("detrkit::relu_dropout_mlp_backward", mutates_args=(), device_types="cpu")
def fused_relu_dropout_mlp_backward(
    grad_output: Tensor,
    input: Tensor,
    weight1: Tensor,
    weight2: Tensor,
    hidden: Tensor,
    p: float,
    # Last, with a default: inductor's generated call leaves out a None in the middle.
    grad_hidden: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`fused_relu_dropout_mlp`'s outputs with respect to
    ``input, weight1, bias1, weight2, bias2``; ``grad_hidden`` may be None (hidden unused)."""
    grad = grad_output.reshape(-1, grad_output.shape[-1])  # [T, C_out]
    tokens = input.reshape(-1, input.shape[-1])  # [T, C]
    grad_weight2 = grad.t() @ hidden
    grad_hidden = grad @ weight2 if grad_hidden is None else torch.addmm(grad_hidden, grad, weight2)
    # [T, d_ffn], fresh: the mask is applied over it
    _kernel().relu_dropout_backward(grad_hidden, hidden, p, True)
    grad_input = (grad_hidden @ weight1).view(input.shape)
    grad_weight1 = grad_hidden.t() @ tokens
    return grad_input, grad_weight1, grad_hidden.sum(0), grad_weight2, grad.sum(0)


@fused_relu_dropout_mlp_backward.register_fake
def _mlp_backward_fake(grad_output, input, weight1, weight2, hidden, p, grad_hidden=None):
    return (
        torch.empty_like(input),
        torch.empty_like(weight1),
        weight1.new_empty(weight1.shape[0]),
        torch.empty_like(weight2),
        weight2.new_empty(weight2.shape[0]),
    )


def _mlp_setup_context(ctx, inputs, output):
    input, weight1, _, weight2, _, ctx.p, _ = inputs
    ctx.save_for_backward(input, weight1, weight2, output[1])
    # `hidden` is an output so that it can be saved; relu_dropout_mlp never returns it, and
    # without this its gradient would be a [tokens, d_ffn] tensor of zeros in every step.
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, grad_output, grad_hidden):
    input, weight1, weight2, hidden = ctx.saved_tensors
    if grad_output is None:
        grad_output = hidden.new_zeros(*input.shape[:-1], weight2.shape[0])
    grads = fused_relu_dropout_mlp_backward(
        grad_output, input, weight1, weight2, hidden, ctx.p, grad_hidden
    )
    return *grads, None, None


fused_relu_dropout_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


def uses_fused_mlp(input: Tensor, linear1: nn.Linear, linear2: nn.Linear, p: float) -> bool:
    """Whether :func:`relu_dropout_mlp` runs the fused operator: where :func:`relu_dropout` would
    use its kernel, with biases, one dtype throughout, no autocast and no hooks on the layers
    (they would not run)."""
    layers = (linear1, linear2)
    return (
        uses_fused_kernel(input, p, training=True)
        and all(layer.bias is not None for layer in layers)
        and all(layer.weight.dtype == input.dtype for layer in layers)
        and not torch.is_autocast_enabled("cpu")
        and not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    )


def relu_dropout_mlp(input: Tensor, linear1: nn.Linear, linear2: nn.Linear, p: float) -> Tensor:
    """``linear2(dropout(relu(linear1(input)), p))`` in training; fused where
    :func:`uses_fused_mlp`, else through :func:`detrkit.ops.relu_dropout`."""
    if not uses_fused_mlp(input, linear1, linear2, p):
        return linear2(relu_dropout(linear1(input), p))
    weights = (linear1.weight, linear1.bias, linear2.weight, linear2.bias)
    return fused_relu_dropout_mlp(input, *weights, p, _draw_seed())[0]
