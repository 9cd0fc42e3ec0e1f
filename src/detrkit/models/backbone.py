"""ResNet backbone with frozen batch norm, and the container that pairs it with a position encoding.

Module names follow the original checkpoints: ``backbone.0.body.<resnet layer>`` for the ResNet and
``backbone.1`` for the position encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

from detrkit.ops import onednn

# Output channels of each stage: bottleneck ResNets (50, 101) and basic-block ones (18, 34).
RESNET_CHANNELS = {
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet101": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet34": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
}


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``, with a frozen batch norm folded into the convolution on the fly.

    A frozen norm is an affine map per channel, ``y * s + (beta - mean * s)`` with
    ``s = gamma / sqrt(var + eps)``, so it can scale the convolution's weights and become its bias:
    one convolution instead of a convolution and two passes over its output (and, in training,
    one fewer pass backward). Equal up to float rounding; gradients reach ``conv.weight`` through
    the scaling. Any other norm runs after the convolution as usual.
    """
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    shift = norm.bias - norm.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


def conv_norm_relu(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(conv(x)))``. Once the norm is folded into the convolution (an Identity left in
    its place), the ReLU runs inside the convolution in bf16 inference (:mod:`detrkit.ops.onednn`)."""
    if isinstance(norm, nn.Identity):
        return onednn.conv2d_relu(conv, x)
    return conv_norm(conv, norm, x).relu_()


def conv_norm_add_relu(conv: nn.Conv2d, norm: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    """``relu(norm(conv(x)) + shortcut)``, a residual block's end; fused as
    :func:`conv_norm_relu`, the addition too."""
    if isinstance(norm, nn.Identity):
        return onednn.conv2d_add_relu(conv, x, shortcut)
    return conv_norm(conv, norm, x).add_(shortcut).relu_()


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's bottleneck block (same modules and names), its norms run by :func:`conv_norm`."""

    # Set by optimize_for_inference (after folding bn3 into conv3): without gradients, add conv3's
    # output into the shortcut's memory instead of into fresh memory; see accumulate_pointwise.
    # The shortcut may be the block's input (the previous block's output), which is then
    # overwritten; the backbone keeps no other reference to it: every stage's first block, whose
    # input is the previous stage's returned feature map, has a downsampling shortcut.
    accumulate_into_shortcut = False

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLUs, as torchvision's: every input they overwrite is a fresh tensor.
        out = conv_norm_relu(self.conv1, self.bn1, x)
        out = conv_norm_relu(self.conv2, self.bn2, out)
        shortcut = _shortcut(self, x)
        if (
            self._may_accumulate()
            and not onednn.fuses(self.conv3, out)  # bf16: faster still, in conv_norm_add_relu
            and can_accumulate_pointwise(self.conv3, out, shortcut)
        ):
            return accumulate_pointwise(self.conv3, out, shortcut).relu_()
        return conv_norm_add_relu(self.conv3, self.bn3, out, shortcut)

    def _may_accumulate(self) -> bool:
        # Hooks on conv3 would not run in place: its module is not called.
        hooked = self.conv3._forward_hooks or self.conv3._forward_pre_hooks
        return self.accumulate_into_shortcut and not torch.is_grad_enabled() and not hooked


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
    """``accumulator += conv(x)`` in place, for a 1x1 convolution of channels-last maps: one
    matrix product that adds into ``accumulator``'s memory, not a fresh output (for an
    800x1066 image, ``layer1``'s are 52 MB: mapped afresh by malloc, and faulted in, every time)
    and an addition after it."""
    rows = accumulator.permute(0, 2, 3, 1).view(-1, conv.out_channels)  # [B*H*W, C_out]
    inputs = x.permute(0, 2, 3, 1).view(-1, conv.in_channels)  # [B*H*W, C_in]
    rows.addmm_(inputs, conv.weight.view(conv.out_channels, conv.in_channels).t())
    if conv.bias is not None:
        rows.add_(conv.bias)
    return accumulator


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's basic block (same modules and names), its norms run by :func:`conv_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        out = conv_norm_relu(self.conv1, self.bn1, x)
        return conv_norm_add_relu(self.conv2, self.bn2, out, _shortcut(self, x))


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    conv, norm = block.downsample
    return conv_norm(conv, norm, x)


# (block, blocks per stage) of torchvision's constructors, with the blocks above.
RESNET_LAYOUTS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier, returning the requested stages.

    With ``norm="frozen"`` (the original, for ImageNet-initialised weights) batch norm is frozen and
    the stem and ``layer1`` are not trained. With ``norm="batch"`` (training from scratch, as on the
    built-in digits, where no pre-trained weights exist) batch norm learns and every stage trains.
    """

    def __init__(
        self,
        name: str = "resnet50",
        dilation: bool = False,
        return_layers: tuple[str, ...] = ("layer4",),
        norm: str = "frozen",
    ) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_CHANNELS)}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet, not {name}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"backbone norm must be 'frozen' or 'batch', got {norm!r}")
        resnet = tv_resnet.ResNet(
            *RESNET_LAYOUTS[name],
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
        )
        # Keep every child up to the last returned stage; names stay those of torchvision.
        last = max(int(layer[-1]) for layer in return_layers)
        keep = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}" for i in range(1, last + 1)]
        self.body = nn.ModuleDict({name: getattr(resnet, name) for name in keep})
        if norm == "frozen":
            self._fix_stem_and_layer1()
        self.return_layers = tuple(return_layers)
        self.num_channels = [RESNET_CHANNELS[name][layer] for layer in return_layers]
        self.strides = [
            {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}[layer]
            for layer in return_layers
        ]

    def _fix_stem_and_layer1(self) -> None:
        # The original trains only layer2-4 of a pre-trained ResNet: the first layers' generic
        # edge and texture filters gain little from detection, and skipping their backward pass
        # (the most expensive, at stride 4) saves time.
        for param_name, param in self.body.named_parameters():
            if not param_name.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)

    def freeze_as_pretrained(self) -> None:
        """Treats this backbone from now on as the original treats an ImageNet-trained one: every
        batch norm becomes a ``FrozenBatchNorm2d`` holding its running statistics, and the stem and
        ``layer1`` stop training. Eval-mode outputs are unchanged. For a ``norm="batch"`` backbone
        after pre-training (see :mod:`detrkit.engine.pretrain`)."""
        for name, module in list(self.body.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps).to(
                    module.running_mean  # same device and dtype: this may run after .to(device)
                )
                for buffer in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buffer).copy_(getattr(module, buffer).detach())
                parent, _, child = name.rpartition(".")
                setattr(self.body.get_submodule(parent) if parent else self.body, child, frozen)
        self._fix_stem_and_layer1()

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Returns the feature maps ``[B, C_l, H_l, W_l]`` and the padding mask resized to each."""
        features = []
        # Run in the weights' dtype (bf16 / fp16 after optimize_for_inference); a no-op in fp32.
        x = images.to(self.body["conv1"].weight.dtype)
        # The stem's ReLU joins its convolution, unless it was replaced or is being watched.
        relu = self.body["relu"]
        fused_relu = type(relu) is nn.ReLU and not (relu._forward_hooks or relu._forward_pre_hooks)
        stem = conv_norm_relu if fused_relu else conv_norm
        x = stem(self.body["conv1"], self.body["bn1"], x)
        for name, module in self.body.items():
            if name in ("conv1", "bn1") or (name == "relu" and fused_relu):  # run above
                continue
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        masks = [resize_mask(mask, f.shape[-2:]) for f in features]
        return features, masks


def resize_mask(mask: Tensor, size: torch.Size) -> Tensor:
    """Nearest-neighbour resize of a padding mask ``[B, H, W]`` to a feature map's size.

    The same pixels as ``F.interpolate(mode="nearest")``, the original's resize, picked by index
    arithmetic: exported to ONNX, interpolate becomes a Resize whose rounding of the source
    positions differs at some sizes, which moves the edge of the padding.
    """
    rows = _nearest_source(mask.shape[-2], size[0], mask.device)  # [h]
    cols = _nearest_source(mask.shape[-1], size[1], mask.device)  # [w]
    return mask[:, rows][:, :, cols]  # [B, h, w]


def _nearest_source(in_size: int, out_size: int, device: torch.device) -> Tensor:
    """The input index each of ``out_size`` outputs reads: ``floor(i * (in / out))`` in float32,
    as PyTorch's nearest mode computes it. The sizes become tensors so that traced graphs keep
    them symbolic."""
    scale = torch.full((), in_size, dtype=torch.float32, device=device) / torch.full(
        (), out_size, dtype=torch.float32, device=device
    )
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long()
    return index.clamp(max=in_size - 1)


class Joiner(nn.Sequential):
    """``backbone.0`` computes features, ``backbone.1`` their position encoding."""

    def __init__(self, backbone: ResNetBackbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(
        self, images: Tensor, mask: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Returns per returned stage: features, padding masks and position encodings."""
        features, masks = self[0](images, mask)
        positions = [self[1](m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, positions
