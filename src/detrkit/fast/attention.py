"""Multi-head attention as ``nn.MultiheadAttention`` (same parameters and results): in inference,
its projections with their bias inside oneDNN's products and no padding mask where nothing is
padded; in training, its attention dropout by detrkit's fast CPU dropout
(:func:`detrkit.ops.dropout`).

In inference (eval mode, no attention weights asked for) the attention is computed here:
torch's ``multi_head_attention_forward`` checks and reshapes in Python on every call, and runs
the three input projections as separate products, each adding its bias in a pass of its own in
bf16. Here a query that is also the key (self-attention, Q = K = x + pos) is projected to both by
one product, bf16 biases are added inside the products (:mod:`detrkit.ops.onednn`), and a key
padding mask without a padded key is left out on a CPU (it would only add zeros; a batch of one
image, or of images of one size, has none). A sequence whose keys are all padded (never an
image's) gets zeros where torch's eval-mode forward gives NaN.

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

from detrkit.fast.deformable_attention import may_have_padding
from detrkit.ops import dot_product_attention, dropout, onednn
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
        inference = not (self.training or need_weights or kwargs) and attn_mask is None
        if inference and self._attends_here(query, key_padding_mask):
            return self._attend_for_inference(query, key, value, key_padding_mask), None
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

    def _attends_here(self, query: Tensor, key_padding_mask: Tensor | None) -> bool:
        """Whether :meth:`_attend_for_inference` computes this module: DETR's configuration
        (batch-first, one packed input projection with bias, no extra keys), a batch and a
        boolean mask."""
        return (
            query.dim() == 3
            and self.batch_first
            and self._qkv_same_embed_dim
            and self.in_proj_bias is not None
            and self.bias_k is None
            and not self.add_zero_attn
            and (key_padding_mask is None or key_padding_mask.dtype == torch.bool)
        )

    def _attend_for_inference(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
    ) -> Tensor:
        channels = query.shape[-1]
        weight, bias = self.in_proj_weight, self.in_proj_bias  # rows: query, key, value
        if query is key:  # Q = K: one product for both
            q, k = onednn.projection(query, weight, bias, 0, 2 * channels).chunk(2, dim=-1)
        else:
            q = onednn.projection(query, weight, bias, 0, channels)
            k = onednn.projection(key, weight, bias, channels, 2 * channels)
        v = onednn.projection(value, weight, bias, 2 * channels, 3 * channels)
        padding = None
        if key_padding_mask is not None and may_have_padding(key_padding_mask):
            padding = key_padding_mask
        attended = dot_product_attention(q, k, v, self.num_heads, padding)  # [B, Q, C]
        return onednn.projection(attended, self.out_proj.weight, self.out_proj.bias, 0, channels)
