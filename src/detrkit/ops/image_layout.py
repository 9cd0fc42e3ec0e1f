"""Images into the dtype and channels-last memory of the backbone's first convolution, in one
pass for fp32 RGB into bf16 on CPUs with AVX-512 BF16 (csrc/image_layout_cpu.cpp)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from detrkit.ops._extension import load_extension


@functools.cache
def _kernel_built() -> bool:
    extension = load_extension()
    return extension is not None and extension.image_layout_kernel_available()


def to_channels_last(images: Tensor, dtype: torch.dtype) -> Tensor:
    """``images`` ``[N, C, H, W]`` in ``dtype`` and channels-last memory: the values of
    ``images.to(dtype).contiguous(memory_format=torch.channels_last)``. One pass of detrkit's
    kernel for contiguous fp32 RGB CPU images into bf16 with no gradient wanted; otherwise torch's
    two copies (dtype, then layout: torch's copy that changes both at once converts element by
    element, and takes longer than the two)."""
    if (
        dtype == torch.bfloat16
        and images.dtype == torch.float32
        and images.dim() == 4
        and images.shape[1] == 3
        and images.is_cpu
        and images.is_contiguous()
        and not (torch.is_grad_enabled() and images.requires_grad)
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        and not torch.onnx.is_in_onnx_export()
        and _kernel_built()
    ):
        return load_extension().rgb_planes_to_channels_last_bf16(images)
    return images.to(dtype).contiguous(memory_format=torch.channels_last)
