"""Preparing a detector for fast training on the same parameters."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from detrkit.fast.attention import FastMultiheadAttention
from detrkit.fast.backbone import FastBasicBlock, FastBottleneck, FastResNetBackbone
from detrkit.fast.deformable_attention import FastMSDeformAttn
from detrkit.fast.inference import as_class, decoder_layer
from detrkit.fast.substitution import substitute
from detrkit.fast.transformer import (
    FastDeformableEncoderLayer,
    FastTransformerDecoderLayer,
    FastTransformerEncoderLayer,
)
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.models.deformable_transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoderLayer,
)
from detrkit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer
from detrkit.ops import Dropout


def optimize_for_training(model: nn.Module) -> nn.Module:
    """Swaps, in place, ``model``'s modules for fast ones that train the same parameters (same
    names, state dict and tensors: an optimizer built before stays valid) and returns it.

    On a CPU: dropout masks from a hash of a seed (drawn from torch's generator, so
    ``torch.manual_seed`` repeats a run) instead of torch's sequential generator, also inside
    attention; the transformer MLP as one operator that writes its ReLU and dropout over its
    first layer's output; each frozen batch norm folded into its convolution on every forward.
    Deformable DETR's attention computes its offsets and weights with one product, and its
    decoder samples the memory before projecting it. Only rounding and the random stream change.
    """
    return substitute(
        model,
        {
            nn.Dropout: as_class(Dropout),
            nn.MultiheadAttention: as_class(FastMultiheadAttention),
            ResNetBackbone: as_class(FastResNetBackbone),
            Bottleneck: as_class(FastBottleneck),
            BasicBlock: as_class(FastBasicBlock),
            TransformerEncoderLayer: as_class(FastTransformerEncoderLayer),
            TransformerDecoderLayer: as_class(FastTransformerDecoderLayer),
            MSDeformAttn: as_class(FastMSDeformAttn),
            DeformableTransformerEncoderLayer: as_class(FastDeformableEncoderLayer),
            DeformableTransformerDecoderLayer: decoder_layer,
        },
    )
