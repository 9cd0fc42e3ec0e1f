"""A residual addition and the LayerNorm after it, in one pass for CPU inference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.ops._extension import load_extension

# The fused kernel's channel vectors: C must be a multiple of this.
_LANES = 16
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _fuses(x: Tensor, residual: Tensor, norm: nn.Module, out: Tensor | None) -> bool:
    if type(norm) is not nn.LayerNorm or norm._forward_hooks or norm._forward_pre_hooks:
        return False
    weight, bias = norm.weight, norm.bias
    if weight is None or bias is None:  # no affine parameters
        return False
    channels, dtype = x.shape[-1], x.dtype
    tensors = (x, residual, weight, bias) if out is None else (x, residual, weight, bias, out)
    if out is not None and (out.shape != x.shape or not out.is_contiguous()):
        return False
    return (
        dtype in _DTYPES
        and channels > 0
        and channels % _LANES == 0
        and tuple(norm.normalized_shape) == (channels,)
        and x.shape == residual.shape
        and all(t.dtype == dtype and t.is_cpu for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        and not torch.onnx.is_in_onnx_export()
        and load_extension() is not None
    )


def add_layer_norm(
    x: Tensor, residual: Tensor, norm: nn.Module, out: Tensor | None = None
) -> Tensor:
    """``norm(x + residual)``, written into ``out`` when given (``x``'s shape) and returned.

    In CPU inference with a plain ``nn.LayerNorm`` over the last axis, one pass of detrkit's
    kernel: the sum rounded to ``x``'s dtype as torch's addition leaves it, then normalised in
    fp32 (fp64 for fp64). Otherwise torch's operators, with autograd."""
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if not _fuses(x, residual, norm, out):
        result = norm(x + residual)
        return result if out is None else out.copy_(result)
    channels = x.shape[-1]
    target = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    rows = target.view(-1, channels)  # a view: out must be contiguous
    load_extension().add_layer_norm_out(
        x.reshape(-1, channels).contiguous(),
        residual.reshape(-1, channels).contiguous(),
        norm.weight.contiguous(),
        norm.bias.contiguous(),
        norm.eps,
        rows,
    )
    return target
