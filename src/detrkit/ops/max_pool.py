"""Max pooling of channels-last CPU tensors without the indices PyTorch's kernel also writes
(csrc/max_pool_cpu.cpp), for inference: the ResNet stem's pool writes 8 bytes of index beside
every 2-byte bf16 output value."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from detrkit.ops._extension import load_extension


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def max_pool2d(
    input: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """``F.max_pool2d(input, kernel_size, stride, padding)`` (dilation 1, floor mode), the same
    values; runs detrkit's kernel where it applies (a channels-last float CPU tensor that needs
    no gradient, the kernel built) and PyTorch's otherwise."""
    stride = kernel_size if stride is None or stride == () else stride
    extension = load_extension()
    applies = (
        extension is not None
        and input.device.type == "cpu"
        and input.dim() == 4
        and input.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and input.is_contiguous(memory_format=torch.channels_last)
        and not (input.requires_grad and torch.is_grad_enabled())
    )
    if not applies:
        return F.max_pool2d(input, kernel_size, stride, padding)
    return extension.max_pool2d_channels_last(
        input, *_pair(kernel_size), *_pair(stride), *_pair(padding)
    )
