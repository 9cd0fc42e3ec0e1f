"""DETR's encoder-decoder transformer.

Tensors are batch-first: sequences are ``[B, S, C]``. Position encodings are added to queries and
keys of every attention, at every layer, and never to values.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.models.attention import MultiheadAttention
from detrkit.ops import Dropout, onednn, relu_dropout_mlp


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def _feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """The position-wise MLP; its Linear layers live on the owning layer, as in the checkpoints."""
    if layer.activation is F.relu and layer.dropout.training:  # the original's activation
        return relu_dropout_mlp(x, layer.linear1, layer.linear2, layer.dropout.p)
    if layer.activation is F.relu:
        # Dropout is off (eval mode). In bf16 inference, bias and ReLU run inside the product.
        return onednn.linear(layer.linear2, onednn.linear(layer.linear1, x, relu=True))
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


class TransformerEncoderLayer(nn.Module):
    """Self-attention over image positions (Q = K = features + pos, V = features), then an MLP."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        # src, pos: [B, HW, C]; key_padding_mask: [B, HW], True on padding
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(self._attend(q, k, x, key_padding_mask))
            return src + self.dropout2(_feed_forward(self, self.norm2(src)))
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self._attend(q, k, src, key_padding_mask)))
        return self.norm2(src + self.dropout2(_feed_forward(self, src)))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        return self.self_attn(q, k, v, key_padding_mask=key_padding_mask, need_weights=False)[0]


class TransformerDecoderLayer(nn.Module):
    """Self-attention among object queries, cross-attention to the image memory, then an MLP."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = ACTIVATIONS[activation]
        self.normalize_before = normalize_before

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        # tgt, query_pos: [B, Q, C]; memory, pos: [B, HW, C]; memory_key_padding_mask: [B, HW]
        # The attention outputs are made contiguous: nn.MultiheadAttention returns [B, Q, C]
        # stored as [Q, B, C], and inductor's frozen-weight Linear (optimize_for_inference with
        # compile=True) views the MLP's input as [B * Q, C], which fails for those strides at
        # batch sizes above one (torch 2.14). The copy is small: [B, Q, C] with Q queries.
        def self_attention(x: Tensor) -> Tensor:
            q = k = _with_pos(x, query_pos)
            return self.self_attn(q, k, x, need_weights=False)[0].contiguous()

        def cross_attention(x: Tensor) -> Tensor:
            return self.multihead_attn(
                _with_pos(x, query_pos),
                _with_pos(memory, pos),
                memory,
                key_padding_mask=memory_key_padding_mask,
                need_weights=False,
            )[0].contiguous()

        if self.normalize_before:
            tgt = tgt + self.dropout1(self_attention(self.norm1(tgt)))
            tgt = tgt + self.dropout2(cross_attention(self.norm2(tgt)))
            return tgt + self.dropout3(_feed_forward(self, self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self_attention(tgt)))
        tgt = self.norm2(tgt + self.dropout2(cross_attention(tgt)))
        return self.norm3(tgt + self.dropout3(_feed_forward(self, tgt)))


class TransformerEncoder(nn.Module):
    def __init__(
        self, layer: TransformerEncoderLayer, num_layers: int, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm  # only with pre-norm layers, whose output is not normalised

    def forward(self, src: Tensor, key_padding_mask: Tensor | None, pos: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.norm = norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None,
        pos: Tensor | None,
        query_pos: Tensor | None,
    ) -> Tensor:
        """Returns every layer's output through the shared final norm: ``[L, B, Q, C]``."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
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
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(*layer_args),
            num_encoder_layers,
            nn.LayerNorm(d_model) if normalize_before else None,
        )
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(*layer_args), num_decoder_layers, nn.LayerNorm(d_model)
        )
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor
    ) -> tuple[Tensor, Tensor]:
        """
        Args:
            src: projected features ``[B, C, H, W]``.
            mask: padding mask ``[B, H, W]``, True on padding.
            query_embed: the object queries' learned positions ``[Q, C]``.
            pos_embed: position encoding of the features ``[B, C, H, W]``.

        Returns:
            decoder outputs of every layer ``[L, B, Q, C]`` and the memory ``[B, C, H, W]``.
        """
        batch, channels, height, width = src.shape
        src = src.flatten(2).transpose(1, 2)  # [B, HW, C]
        pos_embed = pos_embed.flatten(2).transpose(1, 2)  # [B, HW, C]
        mask = mask.flatten(1)  # [B, HW]
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, C]
        tgt = torch.zeros_like(query_pos)  # queries' content starts empty

        memory = self.encoder(src, mask, pos_embed)
        hs = self.decoder(tgt, memory, mask, pos_embed, query_pos)
        return hs, memory.transpose(1, 2).reshape(batch, channels, height, width)
