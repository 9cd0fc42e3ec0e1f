"""ResNet backbone with frozen batch norm, and the container that pairs it with a position encoding.

Module names follow the original checkpoints: ``backbone.0.body.<resnet layer>`` for the ResNet and
``backbone.1`` for the position encoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

RESNET_CHANNELS = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


class ResNetBackbone(nn.Module):
    """torchvision ResNet-50/101 without its classifier, returning the requested stages.

    The stem and ``layer1`` stay frozen, as in the original training; batch norm is always frozen
    (its statistics come from ImageNet pre-training and batches of detection images are too small).
    """

    def __init__(
        self,
        name: str = "resnet50",
        dilation: bool = False,
        return_layers: tuple[str, ...] = ("layer4",),
    ) -> None:
        super().__init__()
        if name not in ("resnet50", "resnet101"):
            raise ValueError(f"backbone must be 'resnet50' or 'resnet101', got {name!r}")
        resnet = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d,
        )
        # Keep every child up to the last returned stage; names stay those of torchvision.
        last = max(int(layer[-1]) for layer in return_layers)
        keep = ["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}" for i in range(1, last + 1)]
        self.body = nn.ModuleDict({name: getattr(resnet, name) for name in keep})
        for param_name, param in self.body.named_parameters():
            if not param_name.startswith(("layer2", "layer3", "layer4")):
                param.requires_grad_(False)
        self.return_layers = tuple(return_layers)
        self.num_channels = [RESNET_CHANNELS[layer] for layer in return_layers]
        self.strides = [
            {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 if dilation else 32}[layer]
            for layer in return_layers
        ]

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Returns the feature maps ``[B, C_l, H_l, W_l]`` and the padding mask resized to each."""
        features = []
        x = images
        for name, module in self.body.items():
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        masks = [resize_mask(mask, f.shape[-2:]) for f in features]
        return features, masks


def resize_mask(mask: Tensor, size: torch.Size) -> Tensor:
    """Nearest-neighbour resize of a padding mask ``[B, H, W]`` to a feature map's size."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


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
