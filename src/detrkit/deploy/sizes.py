"""The smallest image size a model can be exported at.

Tracing treats a size of 1 as special: a feature map of 1 pixel broadcasts, so the exporter fixes
it, and the graph then runs at the export size only (ONNX Runtime fails on any other; a .pt2
refuses larger images). Every feature map must therefore be at least 2x2 at the export size: each
side at least the coarsest stride plus one (DETR: 33, DC5: 17, four-level Deformable DETR with its
stride-64 level: 65). Two-stage Deformable DETR also takes its queries from the encoder's
positions, so the export size must give at least as many positions as it has queries.
"""

from __future__ import annotations

import math
import numbers

from torch import nn

from detrkit.deploy.errors import ExportError


def feature_strides(model: nn.Module) -> list[int]:
    """The stride of every feature level of a detrkit model: the backbone's stages, then
    Deformable DETR's extra levels, each a stride-2 convolution on the one before. A panoptic
    model's backbone is its detector's (``model.detr``)."""
    strides = list(getattr(model, "detr", model).backbone[0].strides)
    levels = getattr(model.config, "num_feature_levels", len(strides))
    for _ in range(levels - len(strides)):
        strides.append(strides[-1] * 2)
    return strides


def feature_sizes(strides: list[int], size: tuple[int, int]) -> list[tuple[int, int]]:
    """Each level's (height, width) for an image of ``size``: every stride-2 convolution and
    pooling of the backbone (padding 1, or 3 for the 7x7 stem) rounds up."""
    height, width = size
    return [(math.ceil(height / stride), math.ceil(width / stride)) for stride in strides]


def required_positions(model: nn.Module) -> int:
    """How many encoder positions the export size must give: two-stage Deformable DETR's
    number of queries (its proposals are the best of those positions), else 1."""
    config = model.config
    return config.num_queries if getattr(config, "two_stage", False) else 1


def smallest_side(strides: list[int]) -> int:
    """The smallest height or width whose coarsest feature map is 2 pixels."""
    return max(strides) + 1


def smallest_square(strides: list[int], positions: int) -> int:
    """The smallest square image size with maps of at least 2x2 and ``positions`` positions."""
    side = smallest_side(strides)
    while sum(h * w for h, w in feature_sizes(strides, (side, side))) < positions:
        side += 1
    return side


def check_export_size(model: nn.Module, size: tuple[int, int], name: str | None = None) -> None:
    """Raises ExportError when ``size`` (height, width) is too small to export ``model`` at,
    stating the smallest size it can be exported at. ``name`` is how the message calls the
    size (default "size HxW")."""
    if len(size) != 2 or not all(isinstance(side, numbers.Integral) for side in size):
        raise ExportError(f"size must be (height, width), two whole numbers, got {size}")
    height, width = size
    name = name or f"size {height}x{width}"
    strides = feature_strides(model)
    side, positions = smallest_side(strides), required_positions(model)
    rule = (
        f"its coarsest feature map (stride {max(strides)}) must be at least 2x2 there, or the "
        f"export would be fixed to maps of 1 pixel, so each side must be at least {side} pixels"
    )
    if positions > 1:
        rule += (
            f", and the image must give at least {positions} encoder positions, as the model "
            f"takes its {positions} queries from them"
        )
    square = smallest_square(strides, positions)
    smallest = f"the smallest square size is {square}x{square}; the export then takes other sizes"
    found = sum(h * w for h, w in feature_sizes(strides, size))
    if min(height, width) < side or found < positions:
        if min(height, width) >= side:  # only the positions are too few: say how many
            smallest = f"it gives {found} ({feature_sizes(strides, size)}); {smallest}"
        raise ExportError(f"{name} is too small to export this model at: {rule}; {smallest}")
