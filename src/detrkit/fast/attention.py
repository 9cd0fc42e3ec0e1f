"""Multi-head attention as ``nn.MultiheadAttention`` (same parameters and results), whose
training-mode attention dropout uses detrkit's fast CPU dropout (:func:`detrkit.ops.dropout`).

In training, torch's CPU attention falls back to its math path and draws a ``[B, heads, Lq, Lk]``
dropout mask with its slow Mersenne Twister at every layer: in DETR's training step that was
most of the time spent drawing masks. This class computes the same math itself with
:func:`detrkit.ops.dropout`; in every other case (eval mode, ``need_weights``, other devices)
it is ``nn.MultiheadAttention``. A boolean ``attn_mask`` (the decoder's in denoising training)
is applied in the fused path too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.ops import dropout
from detrkit.ops.fast_dropout import uses_fused_kernel


class FastMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (``batch_first=True``, packed in-projection, with bias)."""

    reference_class = nn.MultiheadAttention

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        boolean_mask = attn_mask is None or attn_mask.dtype == torch.bool
        fused = uses_fused_kernel(query, self.dropout, self.training)
        if need_weights or kwargs or not boolean_mask or not fused:
            if attn_mask is not None:
                kwargs["attn_mask"] = attn_mask
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                **kwargs,
            )
        return self._attend_with_fused_dropout(query, key, value, key_padding_mask, attn_mask), None

    def _attend_with_fused_dropout(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        batch, num_queries, channels = query.shape
        head_dim = channels // self.num_heads

        def heads(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            # [B, L, C] -> [B, heads, L, head_dim]
            return (
                F.linear(x, weight, bias).unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)
            )

        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = heads(query, w_q, b_q) * head_dim**-0.5
        k, v = heads(key, w_k, b_k), heads(value, w_v, b_v)
        scores = q @ k.transpose(-2, -1)  # [B, heads, Lq, Lk]
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if attn_mask is not None:  # [Lq, Lk] or [B * heads, Lq, Lk], True = blocked
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, *attn_mask.shape[-2:])
            scores = scores.masked_fill(attn_mask, float("-inf"))
        weights = dropout(scores.softmax(-1), self.dropout, training=True)
        attended = (weights @ v).transpose(1, 2).reshape(batch, num_queries, channels)
        return self.out_proj(attended)
