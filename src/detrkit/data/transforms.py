"""The original DETR's augmentations, written with torchvision's transforms v2.

Samples are ``(image, target)``: a ``tv_tensors.Image`` and a dict whose ``boxes`` are
``tv_tensors.BoundingBoxes`` in pixels, so torchvision moves the boxes with the image. After the
transforms, :func:`to_training_sample` turns the boxes into what the models train on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target fields with one entry per box, filtered along with the boxes (``masks``: a
# ``tv_tensors.Mask`` ``[N, H, W]``, which the transforms move with the image).
INSTANCE_FIELDS = ("labels", "area", "iscrowd", "masks")

# What the datasets accept as ``transforms``: (image, target) -> (image, target).
SampleTransform = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


@dataclass(frozen=True)
class AugmentationConfig:
    """Image sizes and probabilities of the augmentations; the defaults are the original DETR's."""

    scales: tuple[int, ...] = tuple(range(480, 801, 32))  # short sides of the multi-scale resize
    max_size: int = 1333  # bound on the long side
    crop_resize_sizes: tuple[int, ...] = (400, 500, 600)  # short sides before the random crop
    crop_min_size: int = 384
    crop_max_size: int = 600
    val_size: int = 800  # short side at validation
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("scales", "crop_resize_sizes"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{name} must be a non-empty list of positive sizes, got {sizes}")
        for name in ("max_size", "crop_min_size", "crop_max_size", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.crop_min_size > self.crop_max_size:
            raise ValueError(
                f"crop_min_size ({self.crop_min_size}) is larger than crop_max_size "
                f"({self.crop_max_size})"
            )
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def scaled(self, factor: float) -> AugmentationConfig:
        """The same augmentations with every size multiplied by ``factor`` (e.g. 0.5 to train at
        half resolution on a CPU or a small dataset)."""

        def scale(size: int) -> int:
            return max(1, round(size * factor))

        return dataclasses.replace(
            self,
            scales=tuple(scale(s) for s in self.scales),
            max_size=scale(self.max_size),
            crop_resize_sizes=tuple(scale(s) for s in self.crop_resize_sizes),
            crop_min_size=scale(self.crop_min_size),
            crop_max_size=scale(self.crop_max_size),
            val_size=scale(self.val_size),
        )


def resized_shape(
    height: int, width: int, short_side: int, max_size: int | None = None
) -> tuple[int, int]:
    """The ``(h, w)`` the original DETR resizes an image to: short side ``short_side``, aspect
    ratio kept, and the short side lowered (rounded) when the long side would exceed
    ``max_size``; the long side is truncated to an int."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * short_side > max_size:
        short_side = round(max_size * short / long)
    if short == short_side:
        return height, width
    if width < height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def _randint(low: int, high: int) -> int:
    """A uniform integer in ``[low, high]``, from torch's generator (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()))


class RandomShortSideResize(v2.Transform):
    """Resizes the short side to a size drawn from ``sizes``, with the long side at most
    ``max_size`` (the original's RandomResize and its rounding, see :func:`resized_shape`)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("sizes must not be empty")
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        short_side = self.sizes[_randint(0, len(self.sizes) - 1)]
        return {"size": list(resized_shape(height, width, short_side, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crops a random region whose height and width are drawn uniformly from
    ``[min_size, min(max_size, image side)]`` (the original's RandomSizeCrop); boxes are clipped
    to the region. A side shorter than ``min_size`` is kept whole."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size} and {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        max_width, max_height = min(width, self.max_size), min(height, self.max_size)
        crop_width = _randint(min(self.min_size, max_width), max_width)
        crop_height = _randint(min(self.min_size, max_height), max_height)
        return {
            "top": _randint(0, height - crop_height),
            "left": _randint(0, width - crop_width),
            "height": crop_height,
            "width": crop_width,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


def instance_fields(sample: Any) -> tuple[Tensor, ...]:
    """The per-box fields of an ``(image, target)`` sample, for SanitizeBoundingBoxes to filter
    with the boxes."""
    target = sample[1]
    return tuple(target[name] for name in INSTANCE_FIELDS if name in target)


class ContiguousImage(v2.Transform):
    """Puts images in the standard memory layout, in a tensor that the in-place normalisation
    after it may overwrite. torchvision's uint8 resize returns channels-last images, on which
    ToDtype and Normalize run several times slower."""

    _transformed_types = (tv_tensors.Image,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.float32:  # ToDtype makes the copy
            return tv_tensors.wrap(inpt.contiguous(), like=inpt)
        return tv_tensors.wrap(inpt.clone(memory_format=torch.contiguous_format), like=inpt)


def _normalize(config: AugmentationConfig) -> list[v2.Transform]:
    return [
        ContiguousImage(),
        v2.ToDtype(torch.float32, scale=True),
        # In place (on ContiguousImage's or ToDtype's copy): a second large allocation costs as
        # much as the arithmetic.
        v2.Normalize(config.mean, config.std, inplace=True),
    ]


def make_train_transforms(config: AugmentationConfig | None = None) -> v2.Compose:
    """The original DETR's training augmentations: horizontal flip; then either a multi-scale
    resize, or a resize, a random crop and the multi-scale resize; then dropping the boxes the
    crop emptied, and ImageNet normalisation.

    torchvision's SanitizeBoundingBoxes drops boxes under 1 pixel wide or high, where the
    original dropped only empty ones.
    """
    config = config or AugmentationConfig()
    multi_scale = RandomShortSideResize(config.scales, config.max_size)
    resize_and_crop = v2.Compose(
        [
            RandomShortSideResize(config.crop_resize_sizes),
            RandomSizeCrop(config.crop_min_size, config.crop_max_size),
            RandomShortSideResize(config.scales, config.max_size),
        ]
    )
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(config.flip_prob),
            v2.RandomChoice([multi_scale, resize_and_crop]),
            # Resizing a box that ends on the image border can leave it a hair outside (float
            # error); SanitizeBoundingBoxes would drop it, so clamp first.
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=instance_fields),
            *_normalize(config),
        ]
    )


def make_val_transforms(config: AugmentationConfig | None = None) -> v2.Compose:
    """Validation: short side ``val_size`` (long side at most ``max_size``) and normalisation."""
    config = config or AugmentationConfig()
    return v2.Compose(
        [RandomShortSideResize([config.val_size], config.max_size), *_normalize(config)]
    )


def to_training_sample(
    image: tv_tensors.Image,
    target: dict[str, Any],
    transforms: SampleTransform | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Applies ``transforms`` to a sample, then converts it to what the models and the loss take:
    a plain image tensor and ``boxes`` as (cx, cy, w, h) divided by the final image's size, with
    ``size`` that image's ``[h, w]``; ``masks``, when there, as a bool tensor ``[N, h, w]``."""
    if transforms is not None:
        image, target = transforms(image, target)
    boxes = target["boxes"]
    if not isinstance(boxes, tv_tensors.BoundingBoxes):
        raise TypeError(
            "target['boxes'] must stay a tv_tensors.BoundingBoxes through the transforms, "
            f"got {type(boxes).__name__}"
        )
    height, width = F.get_size(image)
    cxcywh = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    target = dict(target)
    target["boxes"] = cxcywh.as_subclass(Tensor) / scale  # [N, 4] in [0, 1]
    target["size"] = torch.tensor([height, width])
    if "masks" in target:
        masks = target["masks"]
        if tuple(masks.shape[-2:]) != (height, width):
            raise ValueError(
                f"masks of size {tuple(masks.shape[-2:])} for an image of {(height, width)}: "
                "a sample's masks must cover its image pixel for pixel"
            )
        target["masks"] = masks.as_subclass(Tensor).bool()  # [N, h, w]
    if isinstance(image, Tensor):
        image = image.as_subclass(Tensor)
    return image, target
