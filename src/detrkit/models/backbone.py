"""ResNet backbone with frozen batch norm, and the container that pairs it with a position encoding.

Module names follow the original checkpoints: ``backbone.0.body.<resnet layer>`` for the ResNet and
``backbone.1`` for the position encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FrozenBatchNorm2d

# Output channels of each stage: bottleneck ResNets (50, 101) and basic-block ones (18, 34).
RESNET_CHANNELS = {
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet101": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet34": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
}

# torchvision's constructors, which take the norm layer and the dilation of the last stage.
RESNETS = {
    "resnet18": tv_resnet.resnet18,
    "resnet34": tv_resnet.resnet34,
    "resnet50": tv_resnet.resnet50,
    "resnet101": tv_resnet.resnet101,
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
        # torchvision dilates bottleneck blocks only; the basic-block ResNets end at 512 channels.
        if dilation and RESNET_CHANNELS[name]["layer4"] == 512:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet, not {name}")
        if norm not in ("frozen", "batch"):
            raise ValueError(f"backbone norm must be 'frozen' or 'batch', got {norm!r}")
        resnet = RESNETS[name](
            weights=None,
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
        x = images
        for name, module in self.body.items():  # conv1, bn1, relu, maxpool, layer1, ...
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
