"""Preparing a detector for fast inference: batch norm folded into the convolutions, the
convolutional parts in channels-last layout, and the weights in the chosen precision.

The model passed in is never changed: :func:`optimize_for_inference` returns a copy, for inference
only (its batch norms are gone).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detrkit.models.backbone import Bottleneck as DetrkitBottleneck
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.deformable_attention import MSDeformAttn
from detrkit.models.deformable_transformer import (
    DeformableTransformerEncoderLayer,
)
from detrkit.ops.winograd import WinogradConv2d, is_winograd_compatible

# --precision choices -> the dtype of the weights and activations.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The (convolution, its batch norm) children of torchvision's residual blocks, whose forward runs
# each convolution straight into its norm.
_BLOCK_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

# Tokens per chunk of Deformable DETR's encoder MLP: the [4096, 1024] fp32 hidden activation is
# 16 MB, under glibc's largest mmap threshold (32 MB), so its memory is reused between calls.
# Whole, an 800x1066 image's is [17821, 1024], 73 MB, and every call faults in fresh pages.
ENCODER_MLP_CHUNK = 4096

# Pixels per forward on a CPU (detrkit.models.chunking). Measured here (32 MB last-level cache),
# batches of 8 against chunks: at 800x1066 and 400x533 chunks of one image were 5-25% faster, at
# 300x400 and 200x266 the whole batch was 7-30% faster. One 800x1066 image is 852,800 pixels.
CPU_PIXELS_PER_FORWARD = 1_000_000


def precision_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of a ``precision`` name; ValueError for unknown names and fp16 on a CPU (its
    matrix kernels there are slow emulations, and results drift from fp32 the most)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("precision='fp16' needs a GPU; on a CPU use 'fp32' or 'bf16'")
    return PRECISIONS[precision]


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
            projections run in that layout (faster on CPUs and on tensor cores). Images may still
            be given in the usual layout; features come out channels-last, which makes their
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

    Deformable DETR's attention's offsets and logits come from one matrix product. On a CPU, its
    encoder MLP also runs over chunks of tokens (the same results, less memory traffic); unless
    compiled, and with batch norms folded, the ResNet's bottlenecks add their last convolution
    into the shortcut in place (no fresh output to allocate and add; a block's input is
    overwritten, so keep no reference to the output of a block inside a stage, e.g. from a
    forward hook), and unless compiled, a batch of large images runs a few images at a time (the
    same results; their activations stay in cache).
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
    for module in optimized.modules():
        if isinstance(module, DeformableTransformerEncoderLayer) and on_cpu:
            module.ffn_chunk_tokens = ENCODER_MLP_CHUNK
        if isinstance(module, MSDeformAttn):
            module.merge_query_projections()
    if hasattr(optimized, "cpu_pixels_per_forward") and not compile:
        # Compiled, the chunks would be unrolled into one graph per batch size.
        optimized.cpu_pixels_per_forward = CPU_PIXELS_PER_FORWARD
    # Both need the folded norms: an unfolded frozen norm runs its convolution through conv_norm,
    # which neither calls the convolution module nor lets conv3 accumulate into the shortcut.
    # Both are for CPUs: on a GPU a fresh output costs no page faults, and a 1x1 convolution
    # run as a matrix product would lose cuDNN's TF32 (matrix products stay exact fp32 by default).
    if fold_batchnorm and not compile and on_cpu:
        for module in optimized.modules():
            if isinstance(module, DetrkitBottleneck) and isinstance(module.bn3, nn.Identity):
                module.accumulate_into_shortcut = True
        if winograd and dtype == torch.float32:
            use_winograd_convolutions(optimized)
    optimized.to(dtype)
    # Freezing makes the weights constants, so inductor folds and pre-packs them.
    return torch.compile(optimized, options={"freezing": True}) if compile else optimized


def use_winograd_convolutions(model: nn.Module) -> int:
    """Replaces, in place, every 3x3 stride-1 convolution of the model's ResNet backbones by a
    :class:`~detrkit.ops.WinogradConv2d` sharing its parameters (after any batch norm folding:
    the transformed weights are computed now). Returns how many were replaced."""
    replaced = 0
    for backbone in [module for module in model.modules() if isinstance(module, ResNetBackbone)]:
        for parent in list(backbone.modules()):
            for name, child in list(parent.named_children()):
                if is_winograd_compatible(child):
                    setattr(parent, name, WinogradConv2d.from_conv(child))
                    replaced += 1
    return replaced


def fold_batchnorms(model: nn.Module) -> int:
    """Folds, in place, each batch norm that directly follows a convolution in a ResNet block,
    the ResNet stem or a downsampling branch into that convolution, and replaces the norm with
    :class:`~torch.nn.Identity`. Returns how many were folded."""
    folded = 0
    stems = {id(module.body) for module in model.modules() if isinstance(module, ResNetBackbone)}
    for parent in list(model.modules()):
        for conv_name, norm_name in _conv_norm_pairs(parent, id(parent) in stems):
            conv, norm = parent._modules[conv_name], parent._modules[norm_name]
            if isinstance(conv, nn.Conv2d) and _is_foldable_norm(norm):
                fold_into_conv(conv, norm)
                parent._modules[norm_name] = nn.Identity()
                folded += 1
    return folded


def _conv_norm_pairs(parent: nn.Module, is_stem: bool) -> list[tuple[str, str]]:
    """Names of the children of ``parent`` that run as convolution -> norm."""
    names = list(parent._modules)
    if isinstance(parent, (Bottleneck, BasicBlock)):
        return [pair for pair in _BLOCK_PAIRS if set(pair) <= set(names)]
    if isinstance(parent, nn.Sequential) or is_stem:
        # Containers that run their children in order: each downsampling branch (conv, norm)
        # and the backbone's body, whose stem is conv1, bn1, relu, maxpool.
        return list(itertools.pairwise(names))
    return []


def _is_foldable_norm(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    if isinstance(module, nn.BatchNorm2d):
        # Only statistics gathered in training fold; in train mode a norm uses the batch's own.
        if module.training:
            raise ValueError("fold_batchnorm needs batch norms in eval mode: call model.eval()")
        if module.running_mean is None:
            raise ValueError(
                "fold_batchnorm needs batch norms with running statistics "
                "(track_running_stats=True); pass fold_batchnorm=False"
            )
        return True
    return False


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Makes ``conv`` compute ``norm(conv(x))``: ``w' = w * s``, ``b' = (b - mean) * s + beta``
    with ``s = gamma / sqrt(var + eps)``, per output channel, computed in float64 so that the
    result is rounded once."""
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(var)
    scale = gamma * (var + norm.eps).rsqrt()  # [C_out]
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    new_bias = (bias - norm.running_mean.double()) * scale + beta
    conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), conv.weight.requires_grad)
