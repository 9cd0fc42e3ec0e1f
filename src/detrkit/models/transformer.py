"""DETR's encoder-decoder transformer.

Tensors are batch-first: sequences are ``[B, S, C]``. Position encodings are added to queries and
keys of every attention, at every layer, and never to values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.models.denoising import DenoisingQueries


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    """``x + pos``: positions join queries and keys, never values."""
    return x if pos is None else x + pos


def heads_mask(attn_mask: Tensor | None, num_heads: int) -> Tensor | None:
    """A per-image attention mask ``[B, Lq, Lk]`` as ``nn.MultiheadAttention`` takes it: one
    per image and head, ``[B * heads, Lq, Lk]``."""
    return None if attn_mask is None else attn_mask.repeat_interleave(num_heads, 0)


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class AddNorm:
    """Mixed into the post-norm layers: the residual connection and the norm after a block, as a
    method of its own so that a fast layer can run both in one pass."""

    def add_norm(self, norm: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
        """``norm(x + residual)``."""
        return norm(x + residual)


class TransformerEncoderLayer(AddNorm, nn.Module):
    """Self-attention over image positions (Q = K = features + pos, V = features), then an MLP."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def feed_forward(self, x: Tensor) -> Tensor:
        """The position-wise MLP."""
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def self_attention(
        self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None
    ) -> Tensor:
        """Every position attends to every other: Q = K = src + pos, V = src."""
        q = k = with_pos(src, pos)
        v = src
        return self.self_attn(q, k, v, key_padding_mask=key_padding_mask, need_weights=False)[0]

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        # src, pos: [B, HW, C]; key_padding_mask: [B, HW], True on padding
        if self.normalize_before:
            attended = self.self_attention(self.norm1(src), key_padding_mask, pos)
            src = src + self.dropout1(attended)
            return src + self.dropout2(self.feed_forward(self.norm2(src)))
        attended = self.self_attention(src, key_padding_mask, pos)
        src = self.add_norm(self.norm1, src, self.dropout1(attended))
        return self.add_norm(self.norm2, src, self.dropout2(self.feed_forward(src)))


class TransformerDecoderLayer(AddNorm, nn.Module):
    """Self-attention among object queries, cross-attention to the image memory, then an MLP."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(
            d_model, nhead, dropout=dropout, batch_first=True
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def feed_forward(self, x: Tensor) -> Tensor:
        """The position-wise MLP."""
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def self_attention(
        self, tgt: Tensor, query_pos: Tensor | None, attn_mask: Tensor | None = None
    ) -> Tensor:
        """Queries attend to each other: Q = K = tgt + query_pos, V = tgt. ``attn_mask``
        ``[B, Q, Q]``, True where a query may not look (denoising training), or None."""
        q = k = with_pos(tgt, query_pos)
        attn_mask = heads_mask(attn_mask, self.self_attn.num_heads)
        return self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]

    def cross_attention(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        """Queries attend to the image: Q = tgt + query_pos, K = memory + pos, V = memory."""
        q = with_pos(tgt, query_pos)
        k = with_pos(memory, pos)
        v = memory
        return self.multihead_attn(
            q, k, v, key_padding_mask=memory_key_padding_mask, need_weights=False
        )[0]

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        # tgt, query_pos: [B, Q, C]; memory, pos: [B, HW, C]; memory_key_padding_mask: [B, HW]
        cross = (memory, memory_key_padding_mask, pos, query_pos)
        if self.normalize_before:
            attended = self.self_attention(self.norm1(tgt), query_pos, self_attn_mask)
            tgt = tgt + self.dropout1(attended)
            tgt = tgt + self.dropout2(self.cross_attention(self.norm2(tgt), *cross))
            return tgt + self.dropout3(self.feed_forward(self.norm3(tgt)))
        attended = self.self_attention(tgt, query_pos, self_attn_mask)
        tgt = self.add_norm(self.norm1, tgt, self.dropout1(attended))
        tgt = self.add_norm(self.norm2, tgt, self.dropout2(self.cross_attention(tgt, *cross)))
        return self.add_norm(self.norm3, tgt, self.dropout3(self.feed_forward(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(
        self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.norm = norm  # only with pre-norm layers, whose output is not normalised

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Returns every layer's output through the shared final norm: ``[L, B, Q, C]``.
        ``self_attn_mask``: the queries' self-attention mask (denoising training), or None."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, self_attn_mask)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over ``num_queries`` object queries."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        layer_args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(*layer_args),
            num_encoder_layers,
            nn.LayerNorm(d_model) if normalize_before else None,
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(*layer_args), num_decoder_layers, nn.LayerNorm(d_model)
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,
        mask: Tensor,
        query_embed: Tensor,
        pos_embed: Tensor,
        denoising: DenoisingQueries | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: projected features ``[B, C, H, W]``.
            mask: padding mask ``[B, H, W]``, True on padding.
            query_embed: the object queries' learned positions ``[Q, C]``.
            pos_embed: position encoding of the features ``[B, C, H, W]``.
            denoising: training only: denoising queries decoded before the object queries,
                under their attention mask (their outputs come first).

        Returns:
            decoder outputs of every layer ``[L, B, Q, C]`` and the memory ``[B, C, H, W]``.
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos_embed = pos_embed.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask = mask.flatten(1)  # [B, HW]
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, C]
        tgt = torch.zeros_like(query_pos)  # queries' content starts empty
        self_attn_mask = None
        if denoising is not None:  # DN-DETR: noised objects as extra queries, in front
            tgt = torch.cat([denoising.content.to(tgt.dtype), tgt], 1)
            query_pos = torch.cat([denoising.position.to(query_pos.dtype), query_pos], 1)
            self_attn_mask = denoising.attn_mask

        memory = self.encoder(src, mask, pos_embed)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_pos, self_attn_mask)
        return hs, memory.transpose(1, 2).reshape(batch, channels, height, width)
