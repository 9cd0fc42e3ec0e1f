"""Convolutions and linear layers for bf16 inference on CPUs, with their bias, a residual
addition and ReLU applied by oneDNN inside the matrix kernel.

In bf16, torch's CPU linear layer adds its bias in a second pass, and a ReLU or a residual
addition after a convolution or a linear layer is another: passes over the output at memory
speed, next to matrix kernels that AMX makes several times faster. oneDNN applies them to each
tile of the product before writing it ("post-ops"). Measured on 2 AMX cores: relu(linear) from
256 to 1024 features of 4096 tokens, 1.97 to 0.89 ms; the ReLU'd convolutions of ResNet-50's
stages at 800x1066, one of each shape, 14.8 to 12.4 ms; its 16 blocks' last convolution, shortcut
addition and ReLU, 48.4 to 33.6 ms. In fp32 the fused forms were no faster, so only bf16 takes
them. Results agree to bf16 rounding: ReLU commutes with rounding, and the bias and shortcut are
added to the fp32 accumulator before rounding instead of after.

The operators are torch's own (``torch.ops.mkldnn``, those that inductor's CPU fusions emit);
with a torch build that lacks them, the usual operators run.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def _operators_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default  # noqa: B018 (resolves, or raises)
        torch.ops.mkldnn._convolution_pointwise.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def fuses(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` runs on ``x`` through oneDNN's fused forms: a plain Linear, or a
    zero-padded Conv2d on a batch ``[N, C, H, W]``; bf16 input and weights on a CPU; no autograd,
    autocast, hooks of the module's own, compiling or tracing."""
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or x.dim() != 4:
            return False
    elif type(module) is not nn.Linear:
        return False
    return (
        x.dtype == torch.bfloat16
        and module.weight.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not (module._forward_hooks or module._forward_pre_hooks)
        and _operators_available()
    )


def _convolution_arguments(conv: nn.Conv2d) -> tuple:
    return conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups


def _output_shape(conv: nn.Conv2d, x: Tensor) -> torch.Size:
    """``conv(x).shape`` for a batch ``x``, from the convolution's arithmetic."""
    spatial = [
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride
        )
    ]
    return torch.Size([x.shape[0], conv.out_channels, *spatial])


def conv2d_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))``, the ReLU inside the convolution where :func:`fuses` allows."""
    if fuses(conv, x):
        return torch.ops.mkldnn._convolution_pointwise(
            x, *_convolution_arguments(conv), "relu", [], ""
        )
    return conv(x).relu_()


def conv2d_add_relu(conv: nn.Conv2d, x: Tensor, other: Tensor) -> Tensor:
    """``relu(conv(x) + other)`` (a residual block's end), the addition and ReLU inside the
    convolution where :func:`fuses` allows and ``other`` has the output's shape (the fused form
    does not broadcast)."""
    if fuses(conv, x) and other.dtype == x.dtype and other.shape == _output_shape(conv, x):
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, *_convolution_arguments(conv), "add", 1.0, "relu", [], ""
        )
    return conv(x).add_(other).relu_()


def conv2d_add_relu_(conv: nn.Conv2d, x: Tensor, accumulator: Tensor) -> Tensor:
    """``relu(conv(x) + accumulator)`` written into ``accumulator`` and returned, the addition and
    ReLU inside the convolution (oneDNN's sum post-op) where :func:`fuses` allows and
    ``accumulator`` has the output's shape and ``x``'s dtype and memory format; else
    :func:`conv2d_add_relu` into fresh memory. No fresh output map: the shortcut's memory, just
    written, takes the result."""
    if (
        fuses(conv, x)
        and accumulator.dtype == x.dtype
        and accumulator.shape == _output_shape(conv, x)
        and x.is_contiguous(memory_format=torch.channels_last)
        and accumulator.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            accumulator, x, *_convolution_arguments(conv), "add", 1.0, "relu", [], ""
        )
    return conv2d_add_relu(conv, x, accumulator)


def linear(layer: nn.Linear, x: Tensor, relu: bool = False) -> Tensor:
    """``layer(x)``, or ``relu(layer(x))`` with ``relu``; bias and ReLU inside the product where
    :func:`fuses` allows."""
    if fuses(layer, x):
        attribute = "relu" if relu else "none"
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attribute, [], "")
    # In place: the layer's output is fresh and its gradient needs none of it. A new tensor
    # would be mapped and faulted in page by page on large inputs.
    return layer(x).relu_() if relu else layer(x)
