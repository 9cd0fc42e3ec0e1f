"""Multi-head scaled dot-product attention over ``[B, L, C]`` tensors (the heads side by side in
``C``), by detrkit's AMX kernel in bf16 CPU inference and by torch's
``scaled_dot_product_attention`` otherwise."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.ops._extension import load_extension

# The kernel's products take a head's channels in AMX tiles of 32 bf16.
_HEAD_CHANNELS = 32
# 16 key rows are gathered with 32-bit byte offsets.
_LARGEST_KEY_STRIDE = 2**31 // (16 * 2)


@functools.cache
def _kernel_built() -> bool:
    extension = load_extension()
    return extension is not None and extension.attention_kernel_available()


def dot_product_kernel_applies(
    query: Tensor, key: Tensor, value: Tensor, num_heads: int, key_padding_mask: Tensor | None
) -> bool:
    """Whether :func:`dot_product_attention` runs detrkit's kernel on these inputs: bf16
    ``[B, L, C]`` CPU tensors with contiguous channels and query rows that do not overlap, a key
    and value of the query's batch and channels, a positive multiple of 32 channels per head, at
    least one key, a boolean ``[B, Lk]`` CPU mask or none, no gradient wanted, not compiling,
    tracing or exporting, and a CPU with AMX."""
    tensors = (query, key, value)
    channels = query.shape[-1]
    return (
        all(t.dim() == 3 and t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
        and key.shape == value.shape == (query.shape[0], key.shape[1], channels)
        and all(t.stride(-1) == 1 for t in tensors)
        and (query.shape[1] <= 1 or query.stride(1) >= channels)  # rows apart, a GEMM operand
        and key.stride(1) < _LARGEST_KEY_STRIDE
        and num_heads > 0
        and channels % num_heads == 0
        and channels > 0
        and (channels // num_heads) % _HEAD_CHANNELS == 0
        and key.shape[1] > 0
        and (
            key_padding_mask is None
            or (
                key_padding_mask.dtype == torch.bool
                and key_padding_mask.device.type == "cpu"
                and key_padding_mask.shape == key.shape[:2]
            )
        )
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing())
        and not torch.onnx.is_in_onnx_export()
        and _kernel_built()
    )


def dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """``softmax(Q K^T / sqrt(d)) V`` for each of ``num_heads`` heads, leaving out the keys where
    ``key_padding_mask`` (``[B, Lk]``) is True: ``[B, Lq, C]`` from a query ``[B, Lq, C]`` and a
    key and value ``[B, Lk, C]``. A query whose keys are all padded gets zeros.

    detrkit's kernel where :func:`dot_product_kernel_applies`; torch's
    ``scaled_dot_product_attention`` otherwise (with autograd)."""
    if dot_product_kernel_applies(query, key, value, num_heads, key_padding_mask):
        mask = None if key_padding_mask is None else key_padding_mask.contiguous()
        return load_extension().attention_forward(query, key, value, num_heads, mask)
    batch, num_queries, channels = query.shape
    head_dim = channels // num_heads
    # [B, L, C] -> [B, heads, L, head_dim], strided views
    q, k, v = (t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2) for t in (query, key, value))
    attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # [B, heads, Q, d]
    return attended.transpose(1, 2).reshape(batch, num_queries, channels)
