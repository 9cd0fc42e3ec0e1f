"""The transformer layers of DETR and Deformable DETR, fast: their MLP as one fused operator in
training (ReLU and dropout written over the first layer's output, hashed dropout mask), and with
bias and ReLU inside the matrix products in bf16 CPU inference (oneDNN); each residual addition
and its LayerNorm in one pass in CPU inference. Deformable DETR's encoder MLP can also run over
chunks of tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.models.deformable_transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoderLayer,
)
from detrkit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from detrkit.ops import add_layer_norm, onednn, relu_dropout_mlp

# Tokens per chunk of Deformable DETR's encoder MLP on a CPU: the [4096, 1024] fp32 hidden
# activation is 16 MB, under glibc's largest mmap threshold (32 MB), so its memory is reused
# between calls. Whole, an 800x1066 image's is [17821, 1024], 73 MB, and every call faults in
# fresh pages.
ENCODER_MLP_CHUNK = 4096


def relu_mlp(linear1: nn.Linear, dropout: nn.Dropout, linear2: nn.Linear, x: Tensor) -> Tensor:
    """``linear2(dropout(relu(linear1(x))))``: fused in training, bias and ReLU inside the
    products in bf16 inference."""
    if dropout.training:
        return relu_dropout_mlp(x, linear1, linear2, dropout.p)
    return onednn.linear(linear2, onednn.linear(linear1, x, relu=True))


class FusedAddNorm:
    """Mixed into the fast layers: the residual addition and LayerNorm in one pass in CPU
    inference (:func:`~detrkit.ops.add_layer_norm`)."""

    def add_norm(self, norm: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
        return add_layer_norm(x, residual, norm)


class FastTransformerEncoderLayer(FusedAddNorm, TransformerEncoderLayer):
    reference_class = TransformerEncoderLayer

    def feed_forward(self, x: Tensor) -> Tensor:
        return relu_mlp(self.linear1, self.dropout, self.linear2, x)


class FastTransformerDecoderLayer(FusedAddNorm, TransformerDecoderLayer):
    """The attention outputs are also made contiguous: ``nn.MultiheadAttention`` returns
    ``[B, Q, C]`` stored as ``[Q, B, C]``, and inductor's frozen-weight Linear
    (``optimize_for_inference(compile=True)``) views the MLP's input as ``[B * Q, C]``, which
    fails for those strides at batch sizes above one (torch 2.14). The copy is small."""

    reference_class = TransformerDecoderLayer

    def feed_forward(self, x: Tensor) -> Tensor:
        return relu_mlp(self.linear1, self.dropout, self.linear2, x)

    def self_attention(
        self, tgt: Tensor, query_pos: Tensor | None, attn_mask: Tensor | None = None
    ) -> Tensor:
        return super().self_attention(tgt, query_pos, attn_mask).contiguous()

    def cross_attention(self, *args: Tensor | None) -> Tensor:
        return super().cross_attention(*args).contiguous()


class FastDeformableEncoderLayer(FusedAddNorm, DeformableTransformerEncoderLayer):
    reference_class = DeformableTransformerEncoderLayer

    def feed_forward(self, src: Tensor, out: Tensor | None = None) -> Tensor:
        """The MLP block, written into ``out`` when given."""
        src2 = relu_mlp(self.linear1, self.dropout2, self.linear2, src)
        return add_layer_norm(src, self.dropout3(src2), self.norm2, out)


class ChunkedDeformableEncoderLayer(FastDeformableEncoderLayer):
    """Runs the MLP block over :data:`ENCODER_MLP_CHUNK` tokens at a time. Every token's MLP is
    its own, so the result is the same, while the hidden activations stay small enough for the
    allocator to reuse their memory instead of mapping fresh pages on every call."""

    def feed_forward(self, src: Tensor, out: Tensor | None = None) -> Tensor:
        tokens = src.reshape(-1, src.shape[-1])  # [B * S, C]
        # Each chunk's result goes straight into its rows of the output.
        rows = torch.empty_like(tokens) if out is None else out.view(tokens.shape)
        for start in range(0, len(tokens), ENCODER_MLP_CHUNK):
            chunk = slice(start, start + ENCODER_MLP_CHUNK)
            super().feed_forward(tokens[chunk], rows[chunk])
        return rows.view(src.shape)


class FastDeformableDecoderLayer(FusedAddNorm, DeformableTransformerDecoderLayer):
    reference_class = DeformableTransformerDecoderLayer

    def feed_forward(self, tgt: Tensor) -> Tensor:
        tgt2 = relu_mlp(self.linear1, self.dropout3, self.linear2, tgt)
        return self.add_norm(self.norm3, tgt, self.dropout4(tgt2))
