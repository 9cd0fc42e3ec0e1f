"""The ResNet backbone, fast: batch norms folded into the convolutions before them, the ReLU and
the residual addition inside the convolution (oneDNN, bf16 inference), and the last convolution
of a bottleneck added into the shortcut's memory (CPU inference).

Training folds each frozen batch norm into its convolution on every forward
(:func:`conv_norm`): one pass over the output instead of three, and gradients still reach the
convolution's weights. Inference folds every foldable norm once (:func:`fold_batchnorms`) and
leaves an Identity in its place.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detrkit.models.backbone import ResNetBackbone, resize_mask
from detrkit.ops import WinogradConv2d, max_pool2d, onednn, to_channels_last
from detrkit.ops.winograd import is_winograd_compatible

# The (convolution, its batch norm) children of torchvision's residual blocks, whose forward runs
# each convolution straight into its norm.
_BLOCK_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def norm_scale_and_shift(
    norm: nn.Module, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """A batch norm in eval mode as the affine map it is per channel, ``y * scale + shift``:
    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (in ``dtype`` when
    given, e.g. float64 to round a fold once)."""

    def read(name: str, default: float) -> Tensor:
        tensor = getattr(norm, name)
        if tensor is None:  # affine=False
            tensor = torch.full_like(norm.running_var, default)
        return tensor if dtype is None else tensor.to(dtype)

    scale = read("weight", 1.0) * (read("running_var", 0.0) + norm.eps).rsqrt()  # [C_out]
    return scale, read("bias", 0.0) - read("running_mean", 0.0) * scale


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``, a frozen batch norm folded into the convolution's weights and bias for
    this call (gradients reach ``conv.weight`` through the scaling); any other norm runs after
    the convolution."""
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale, shift = norm_scale_and_shift(norm)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


def conv_norm_relu(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(conv(x)))``; with the norm folded away (an Identity), the ReLU runs inside the
    convolution in bf16 inference."""
    if isinstance(norm, nn.Identity):
        return onednn.conv2d_relu(conv, x)
    return conv_norm(conv, norm, x).relu_()


def conv_norm_add_relu(conv: nn.Conv2d, norm: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    """``relu(norm(conv(x)) + shortcut)``, a residual block's end, fused as :func:`conv_norm_relu`
    with the addition too."""
    if isinstance(norm, nn.Identity):
        return onednn.conv2d_add_relu(conv, x, shortcut)
    return conv_norm(conv, norm, x).add_(shortcut).relu_()


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    conv, norm = block.downsample
    if isinstance(norm, nn.Identity):  # folded: the packed weight in bf16 inference
        return onednn.conv2d(conv, x)
    return conv_norm(conv, norm, x)


class FastBottleneck(Bottleneck):
    """torchvision's bottleneck, its norms and ReLUs run by :func:`conv_norm_relu` and friends."""

    reference_class = Bottleneck

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLUs, as torchvision's: every input they overwrite is a fresh tensor.
        out = conv_norm_relu(self.conv1, self.bn1, x)
        out = conv_norm_relu(self.conv2, self.bn2, out)
        return conv_norm_add_relu(self.conv3, self.bn3, out, _shortcut(self, x))


class AccumulatingBottleneck(FastBottleneck):
    """For CPU inference with bn3 folded away: conv3's output is added into the shortcut's memory
    (one matrix product that accumulates) instead of into fresh memory. For an 800x1066 image
    ``layer1``'s maps are 52 MB, which malloc maps afresh, and faults in, on every call.

    The shortcut may be the block's input, the previous block's output, which is then
    overwritten: keep no reference to a block's output inside a stage (e.g. from a forward hook).
    The backbone keeps none: every stage's first block has a downsampling shortcut."""

    def forward(self, x: Tensor) -> Tensor:
        out = conv_norm_relu(self.conv1, self.bn1, x)
        out = conv_norm_relu(self.conv2, self.bn2, out)
        shortcut = _shortcut(self, x)
        hooked = self.conv3._forward_hooks or self.conv3._forward_pre_hooks  # would not run
        if not torch.is_grad_enabled() and not hooked and isinstance(self.bn3, nn.Identity):
            if onednn.fuses(self.conv3, out):  # bf16: the sum and ReLU inside oneDNN's kernel
                return onednn.conv2d_add_relu_(self.conv3, out, shortcut)
            if can_accumulate_pointwise(self.conv3, out, shortcut):
                return accumulate_pointwise(self.conv3, out, shortcut).relu_()
        return conv_norm_add_relu(self.conv3, self.bn3, out, shortcut)


def can_accumulate_pointwise(conv: nn.Module, x: Tensor, accumulator: Tensor) -> bool:
    """Whether :func:`accumulate_pointwise` computes ``accumulator + conv(x)`` here: a 1x1
    stride-1 convolution, and maps of one dtype in channels-last memory."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and x.dtype == accumulator.dtype == conv.weight.dtype
        and x.is_contiguous(memory_format=torch.channels_last)
        and accumulator.is_contiguous(memory_format=torch.channels_last)
        and accumulator.shape == (x.shape[0], conv.out_channels, *x.shape[2:])
    )


def accumulate_pointwise(conv: nn.Conv2d, x: Tensor, accumulator: Tensor) -> Tensor:
    """``accumulator += conv(x)`` in place, for a 1x1 convolution of channels-last maps."""
    rows = accumulator.permute(0, 2, 3, 1).view(-1, conv.out_channels)  # [B*H*W, C_out]
    inputs = x.permute(0, 2, 3, 1).view(-1, conv.in_channels)  # [B*H*W, C_in]
    rows.addmm_(inputs, conv.weight.view(conv.out_channels, conv.in_channels).t())
    if conv.bias is not None:
        rows.add_(conv.bias)
    return accumulator


class FastBasicBlock(BasicBlock):
    """torchvision's basic block, its norms and ReLUs run by :func:`conv_norm_relu` and friends."""

    reference_class = BasicBlock

    def forward(self, x: Tensor) -> Tensor:
        out = conv_norm_relu(self.conv1, self.bn1, x)
        return conv_norm_add_relu(self.conv2, self.bn2, out, _shortcut(self, x))


class FastMaxPool2d(nn.MaxPool2d):
    """The stem's max pooling without the indices PyTorch's CPU kernel also writes
    (:func:`detrkit.ops.max_pool2d`); any other configuration runs the reference's."""

    reference_class = nn.MaxPool2d

    def forward(self, input: Tensor) -> Tensor:  # the reference's argument name
        if self.dilation not in (1, (1, 1)) or self.ceil_mode or self.return_indices:
            return super().forward(input)
        return max_pool2d(input, self.kernel_size, self.stride, self.padding)


class FastResNetBackbone(ResNetBackbone):
    """The backbone with its stem's norm and ReLU joined to the convolution, run in the weights'
    dtype (bf16 or fp16 after ``optimize_for_inference``)."""

    reference_class = ResNetBackbone

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        body = self.body
        weight = body["conv1"].weight
        if weight.is_contiguous(memory_format=torch.channels_last):
            x = to_channels_last(images, weight.dtype)
        else:
            x = images.to(weight.dtype)
        relu = body["relu"]
        # The ReLU joins the convolution unless it is being watched (its hooks would not run).
        fused_relu = type(relu) is nn.ReLU and not (relu._forward_hooks or relu._forward_pre_hooks)
        x = (conv_norm_relu if fused_relu else conv_norm)(body["conv1"], body["bn1"], x)
        skip = {"conv1", "bn1"} | ({"relu"} if fused_relu else set())
        features = []
        for name, module in body.items():
            if name in skip:
                continue
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        return features, [resize_mask(mask, f.shape[-2:]) for f in features]


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
    """Makes ``conv`` compute ``norm(conv(x))``: weights times the norm's scale, bias through
    its affine map, per output channel, in float64 so that the result is rounded once."""
    scale, shift = norm_scale_and_shift(norm, torch.float64)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(
        (bias * scale + shift).to(conv.weight.dtype), conv.weight.requires_grad
    )


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


def plain_convolution(conv: WinogradConv2d) -> nn.Conv2d:
    """The ordinary convolution a :class:`~detrkit.ops.WinogradConv2d` computes (its parameters,
    shared)."""
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None)
    plain.weight, plain.bias = conv.weight, conv.bias
    return plain.train(conv.training)
