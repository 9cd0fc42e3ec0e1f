"""Preparing a detector for fast inference: a copy whose modules are swapped for fast ones, batch
norm folded into the convolutions, the convolutional parts channels-last, in the chosen precision.

The model passed in is never changed; the copy is for inference only (its batch norms are gone).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from detrkit.fast.attention import FastMultiheadAttention
from detrkit.fast.backbone import (
    AccumulatingBottleneck,
    FastBasicBlock,
    FastBottleneck,
    FastMaxPool2d,
    FastResNetBackbone,
    fold_batchnorms,
    use_winograd_convolutions,
)
from detrkit.fast.chunking import chunked
from detrkit.fast.deformable_attention import FastMSDeformAttn, SampleFirstMSDeformAttn
from detrkit.fast.position import FastPositionEmbeddingSine
from detrkit.fast.substitution import Replacement, adopt, substitute
from detrkit.fast.transformer import (
    ChunkedDeformableEncoderLayer,
    FastDeformableDecoderLayer,
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
from detrkit.models.kinds import KINDS
from detrkit.models.position_encoding import PositionEmbeddingSine
from detrkit.models.transformer import TransformerDecoderLayer, TransformerEncoderLayer

# --precision choices -> the dtype of the weights and activations.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of a ``precision`` name; ValueError for unknown names and fp16 on a CPU (its
    matrix kernels there are slow emulations, and results drift from fp32 the most)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("precision='fp16' needs a GPU; on a CPU use 'fp32' or 'bf16'")
    return PRECISIONS[precision]


def as_class(cls: type[nn.Module]) -> Replacement:
    """The replacement that has ``cls`` take over a module's state."""
    return lambda module: adopt(module, cls)


def decoder_layer(layer: nn.Module) -> nn.Module:
    """The fast decoder layer, its cross-attention sampling before projecting where cheaper."""
    fast = adopt(layer, FastDeformableDecoderLayer)
    fast.cross_attn = adopt(fast.cross_attn, SampleFirstMSDeformAttn)
    return fast


def fast_modules(on_cpu: bool, accumulate: bool) -> dict[type[nn.Module], Replacement]:
    """The reference module types and their fast replacements for inference; ``accumulate``
    (eager on a CPU) adds those that call detrkit's kernels outside torch's operators."""
    eager_cpu: dict[type[nn.Module], Replacement] = (
        {nn.MaxPool2d: as_class(FastMaxPool2d)} if accumulate else {}
    )
    return eager_cpu | {
        nn.MultiheadAttention: as_class(FastMultiheadAttention),
        PositionEmbeddingSine: as_class(FastPositionEmbeddingSine),
        ResNetBackbone: as_class(FastResNetBackbone),
        Bottleneck: as_class(AccumulatingBottleneck if accumulate else FastBottleneck),
        BasicBlock: as_class(FastBasicBlock),
        TransformerEncoderLayer: as_class(FastTransformerEncoderLayer),
        TransformerDecoderLayer: as_class(FastTransformerDecoderLayer),
        MSDeformAttn: as_class(FastMSDeformAttn),
        DeformableTransformerEncoderLayer: as_class(
            ChunkedDeformableEncoderLayer if on_cpu else FastDeformableEncoderLayer
        ),
        DeformableTransformerDecoderLayer: decoder_layer,
    }


# Never under inference_mode: the copy's weights would be inference tensors, which keep no
# version counter, and oneDNN's packed weights (detrkit.ops.onednn) could not follow them.
@torch.inference_mode(False)
def optimize_for_inference(
    model: nn.Module,
    precision: str = "fp32",
    channels_last: bool = True,
    fold_batchnorm: bool = True,
    winograd: bool = True,
    compile: bool = False,
) -> nn.Module:
    """A copy of ``model`` prepared for inference, on the model's device.

    Args:
        model: a DETR or Deformable DETR (any module works; only the parts named below change).
        precision: "fp32" (the default; the same results as ``model`` within rounding), "bf16"
            (CPU and GPU) or "fp16" (GPU only).
        channels_last: store convolution weights channels-last, so the backbone and input
            projections run in that layout. Features come out channels-last, which makes their
            flattening into token sequences free.
        fold_batchnorm: fold every batch norm of the ResNet (frozen, or trainable in eval mode)
            into the convolution before it.
        winograd: on a CPU in fp32, with batch norms folded, compute the ResNet's 3x3 stride-1
            convolutions by Winograd's F(4x4, 3x3) (:class:`~detrkit.ops.WinogradConv2d`): 4x
            fewer multiplications, several times the rounding error of a direct convolution
            (about 1e-5 of the largest output). Not compiled.
        compile: also compile the model with ``torch.compile`` (inductor, weights frozen into
            the graph). It pays for many images of one size: the first call takes minutes, and
            so does each new size.

    Every module of the papers' computation is swapped for its fast form (same parameters and
    results up to rounding; see :mod:`detrkit.fast`). On a CPU, Deformable DETR's encoder MLP
    runs over chunks of tokens; unless compiled, with batch norms folded, the ResNet's
    bottlenecks add their last convolution into the shortcut in place (a block's input is
    overwritten: keep no reference to the output of a block inside a stage), and a batch of large
    images runs a few images at a time.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = precision_dtype(precision, device)
    # Parameters keep requires_grad: inference runs under no_grad anyway, and torch.export
    # specialises the batch size of matrix products with weights that require no gradient.
    optimized = copy.deepcopy(model).eval()
    if fold_batchnorm:
        fold_batchnorms(optimized)
    if channels_last:
        optimized.to(memory_format=torch.channels_last)
    on_cpu = device.type == "cpu"
    # In-place accumulation and Winograd need the folded norms, and are for CPUs: on a GPU a
    # fresh output costs no page faults, and a 1x1 convolution run as a matrix product would
    # lose cuDNN's TF32. Compiled, inductor plans memory itself and Winograd's kernels are not
    # graph operators.
    eager_cpu = fold_batchnorm and on_cpu and not compile
    optimized = substitute(optimized, fast_modules(on_cpu, accumulate=eager_cpu))
    detectors = tuple(kind.model_class for kind in KINDS.values())
    if isinstance(optimized, detectors) and on_cpu and not compile:
        # Compiled, the chunks would be unrolled into one graph per batch size.
        optimized = adopt(optimized, chunked(type(optimized)))
    if eager_cpu and winograd and dtype == torch.float32:
        use_winograd_convolutions(optimized)
    optimized.to(dtype)
    # Freezing makes the weights constants, so inductor folds and pre-packs them.
    return torch.compile(optimized, options={"freezing": True}) if compile else optimized
