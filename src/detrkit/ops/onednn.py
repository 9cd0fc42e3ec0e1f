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

oneDNN's AMX kernels read weights in a blocked layout of their own, and torch reorders a plain
weight into it on every call: for ResNet-50's convolutions in bf16, 47 MB read and written per
image, besides the fixed cost it adds to each small product (a decoder's linear layer over 100
queries, 256 to 2048 features: 84 us with the reorder, 60 us without). So each convolution and
linear weight is reordered once (:func:`packed_weight`) and the blocked copy kept beside the
parameter, which stays as it is (the state dict does not change). The copy is made again
whenever the weight changes: written in place (an optimizer step, ``load_state_dict``), replaced,
or cast.

The operators are torch's own (``torch.ops.mkldnn``, those that inductor's CPU fusions emit and
prepack for); with a torch build that lacks them, the usual operators run.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Operators:
    """torch's oneDNN operators, each overload resolved once (through ``torch.ops`` on every call,
    the lookup costs as much as a small product's Python overhead)."""

    def __init__(self) -> None:
        self.linear = torch.ops.mkldnn._linear_pointwise.default
        self.convolution = torch.ops.mkldnn._convolution_pointwise.default
        self.convolution_binary = torch.ops.mkldnn._convolution_pointwise.binary
        self.convolution_binary_ = torch.ops.mkldnn._convolution_pointwise_.binary
        self.reorder_convolution = torch._C._nn.mkldnn_reorder_conv2d_weight
        self.reorder_linear = torch.ops.mkldnn._reorder_linear_weight


@functools.cache
def _operators() -> _Operators | None:
    """torch's oneDNN operators, or None where this torch build lacks them."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return _Operators()
    except (AttributeError, RuntimeError):
        return None


def _fusable(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of ``x`` with ``weight`` may run through oneDNN's fused forms: bf16
    input and weight on a CPU; no autograd, autocast, compiling or tracing."""
    return (
        x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.is_cpu
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _operators() is not None
    )


def fuses(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` runs on ``x`` through oneDNN's fused forms: a plain Linear, or a
    zero-padded Conv2d on a batch ``[N, C, H, W]``; no hooks of the module's own; and the
    conditions of bf16 inference on a CPU (no autograd, autocast, compiling or tracing)."""
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or x.dim() != 4:
            return False
    elif type(module) is not nn.Linear:
        return False
    hooked = module._forward_hooks or module._forward_pre_hooks
    return not hooked and _fusable(x, module.weight)


class _Copies:
    """The packed copies of one weight: {part: (stamps, blocked copy)}, and a weak reference to
    the weight that drops this entry when the weight dies."""

    def __init__(self, weight: Tensor) -> None:
        key = id(weight)
        self.weight = weakref.ref(weight, lambda _: _PACKED.pop(key, None))
        self.copies: dict = {}


# id(weight) -> its copies, part None for a whole weight or (start, stop) for a linear map's
# rows. Keyed by identity (a plain dict: looked up on every product) and held weakly: a copy
# lives as long as its parameter.
_PACKED: dict[int, _Copies] = {}


def _stamp(weight: Tensor) -> tuple:
    """What tells a weight's values apart from those it was packed from: its version counter,
    which every in-place write through the tensor (or a view or ``detach()`` of it) moves, and
    its storage, referred to weakly (a copy must not keep a replaced weight's memory alive) and
    compared by identity, which a replacement of ``.data`` or a cast changes."""
    storage = weight.untyped_storage()
    return weight._version, weakref.ref(storage), weight.storage_offset(), weight.dtype


def packed_weight(
    weight: Tensor,
    pack: Callable[[], Tensor],
    part: tuple | None = None,
    also: tuple[Tensor, ...] = (),
) -> Tensor | None:
    """``pack()``, oneDNN's blocked copy of ``weight``, made on the first call and again after
    ``weight`` changes (written in place, as optimizers and ``load_state_dict`` do, replaced or
    cast). Writes through a tensor that shares the memory but not the version counter
    (``weight.data``, a NumPy view) are not seen. None for a weight made under
    ``torch.inference_mode``: it has no version counter, so a copy could not follow it; the
    caller passes the plain weight, which torch reorders on every call. ``part`` tells apart
    copies of different rows of one weight; ``also``, the other weights a copy is made from (the
    weights of layers put side by side), which are followed as ``weight`` is."""
    entry = _PACKED.get(id(weight))
    if entry is not None and entry.weight() is weight:
        cached = entry.copies.get(part)
        if cached is not None and all(map(_unchanged, (weight, *also), cached[0])):
            return cached[1]
    tensors = (weight, *also)
    if any(tensor.is_inference() for tensor in tensors):
        return None
    if entry is None or entry.weight() is not weight:
        entry = _PACKED[id(weight)] = _Copies(weight)
    cached = entry.copies[part] = (tuple(map(_stamp, tensors)), pack())
    return cached[1]


def _unchanged(weight: Tensor, stamp: tuple) -> bool:
    version, storage, offset, dtype = stamp
    # A storage that has died since (its reference gives None) is not the current one.
    same_storage = storage() is weight.untyped_storage()
    return same_storage and (version, offset, dtype) == (
        weight._version,
        weight.storage_offset(),
        weight.dtype,
    )


def _convolution_arguments(conv: nn.Conv2d, x: Tensor) -> tuple:
    """The weight, packed for inputs shaped as ``x`` (later inputs of other sizes use it too:
    oneDNN picks the weight's layout from the channels and kernel), and the other arguments."""

    weight = conv.weight

    def pack() -> Tensor:
        return _operators().reorder_convolution(
            weight.to_mkldnn(), conv.padding, conv.stride, conv.dilation, conv.groups, list(x.shape)
        )

    packed = packed_weight(weight, pack)
    return (
        weight if packed is None else packed,
        conv.bias,
        conv.padding,
        conv.stride,
        conv.dilation,
        conv.groups,
    )


def _output_shape(conv: nn.Conv2d, x: Tensor) -> torch.Size:
    """``conv(x).shape`` for a batch ``x``, from the convolution's arithmetic."""
    spatial = [
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride
        )
    ]
    return torch.Size([x.shape[0], conv.out_channels, *spatial])


def conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)``, with the packed weight where :func:`fuses` allows."""
    if fuses(conv, x):
        return _operators().convolution(x, *_convolution_arguments(conv, x), "none", [], "")
    return conv(x)


def conv2d_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))``, the ReLU inside the convolution where :func:`fuses` allows."""
    if fuses(conv, x):
        return _operators().convolution(x, *_convolution_arguments(conv, x), "relu", [], "")
    return conv(x).relu_()


def conv2d_add_relu(conv: nn.Conv2d, x: Tensor, other: Tensor) -> Tensor:
    """``relu(conv(x) + other)`` (a residual block's end), the addition and ReLU inside the
    convolution where :func:`fuses` allows and ``other`` has the output's shape (the fused form
    does not broadcast)."""
    if fuses(conv, x) and other.dtype == x.dtype and other.shape == _output_shape(conv, x):
        return _operators().convolution_binary(
            x, other, *_convolution_arguments(conv, x), "add", 1.0, "relu", [], ""
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
        return _operators().convolution_binary_(
            accumulator, x, *_convolution_arguments(conv, x), "add", 1.0, "relu", [], ""
        )
    return conv2d_add_relu(conv, x, accumulator)


def _reorder_linear(weight: Tensor, x: Tensor) -> Tensor:
    """oneDNN's blocked copy of a linear weight, for products with inputs shaped as ``x`` (later
    inputs of other sizes use it too, with the same results)."""
    tokens = x.numel() // max(x.shape[-1], 1)
    return _operators().reorder_linear(weight.contiguous(), tokens)


def _linear_weight(weight: Tensor, start: int, stop: int, x: Tensor) -> Tensor:
    """Rows ``start:stop`` of a linear map's weight, packed (:func:`_reorder_linear`)."""
    packed = packed_weight(weight, lambda: _reorder_linear(weight[start:stop], x), (start, stop))
    return weight[start:stop] if packed is None else packed


def linear(layer: nn.Linear, x: Tensor, relu: bool = False) -> Tensor:
    """``layer(x)``, or ``relu(layer(x))`` with ``relu``; bias and ReLU inside the product, and the
    weight packed, where :func:`fuses` allows."""
    if fuses(layer, x):
        attribute = "relu" if relu else "none"
        weight = _linear_weight(layer.weight, 0, layer.out_features, x)
        return _operators().linear(x, weight, layer.bias, attribute, [], "")
    # In place: the layer's output is fresh and its gradient needs none of it. A new tensor
    # would be mapped and faulted in page by page on large inputs.
    return layer(x).relu_() if relu else layer(x)


def stacked_linear(x: Tensor, layers: Sequence[nn.Linear]) -> Tensor:
    """``torch.cat([layer(x) for layer in layers], -1)`` as one matrix product: the layers'
    weights side by side, packed once in bf16 inference (and again when any of them changes), put
    side by side on every call otherwise."""
    weights = tuple(layer.weight for layer in layers)
    bias = torch.cat([layer.bias for layer in layers])
    same_dtype = all(t.dtype == weights[0].dtype for t in (*weights, bias))
    if _fusable(x, weights[0]) and same_dtype:
        part = ("stacked", *map(id, weights[1:]))
        packed = packed_weight(
            weights[0], lambda: _reorder_linear(torch.cat(weights), x), part, also=weights[1:]
        )
        if packed is not None:
            return _operators().linear(x, packed, bias, "none", [], "")
    weight = torch.cat(weights)
    return projection(x, weight, bias, 0, len(weight))


def projection(x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int) -> Tensor:
    """``F.linear(x, weight[start:stop], bias[start:stop])``: the output features ``start:stop``
    of a linear map (e.g. the query, key or value rows of attention's packed input projection),
    its bias inside the product where bf16 inference allows."""
    rows = slice(start, stop)
    part_bias = None if bias is None else bias[rows]
    if _fusable(x, weight) and (bias is None or bias.dtype == weight.dtype):
        packed = _linear_weight(weight, start, stop, x)
        return _operators().linear(x, packed, part_bias, "none", [], "")
    return F.linear(x, weight[rows], part_bias)
