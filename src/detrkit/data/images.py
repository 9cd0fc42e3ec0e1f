"""People's own images into a model's input: any image type to RGB ``uint8``, the validation
resize, normalisation and padding into one batch. :class:`detrkit.Detector` and
:class:`detrkit.deploy.ExportedModel` both prepare images here, so that they see the same pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from detrkit.data.batching import pad_images
from detrkit.data.coco import read_image
from detrkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationConfig,
    make_val_transforms,
)

# The original's validation resize: short side 800, long side at most 1333.
SHORT_SIDE, MAX_SIZE = 800, 1333

# What counts as one image.
ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor


def scaled_image_size(image_scale: float) -> tuple[int, int]:
    """The ``(short side, max size)`` of the validation resize at ``image_scale`` (a ``detrkit
    train`` run's): 800 and 1333 times the scale, rounded."""
    return round(SHORT_SIDE * image_scale), round(MAX_SIZE * image_scale)


def to_uint8_image(image: ImageInput) -> Tensor:
    """Any supported image as RGB ``uint8`` ``[3, H, W]``.

    Paths are read with :func:`detrkit.data.read_image` (raising ImageReadError naming the file).
    PIL images are converted to RGB. numpy arrays are ``[H, W]`` or ``[H, W, C]`` (channels last,
    as PIL and OpenCV give them, RGB order); tensors are ``[H, W]`` or ``[C, H, W]`` (channels first,
    as torchvision's). Both may be ``uint8`` or floating point in [0, 1]; 1 channel is grey, 4 is
    RGBA (alpha dropped).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        shape = image.shape  # as given, for errors
        if image.ndim == 3:
            image = np.moveaxis(image, -1, 0)  # [H, W, C] -> [C, H, W]
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        return _channels_first_to_uint8(tensor, "array", shape)
    if isinstance(image, Tensor):
        return _channels_first_to_uint8(image.detach().cpu(), "tensor", image.shape)
    raise TypeError(
        f"an image must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}"
    )


def _channels_first_to_uint8(image: Tensor, kind: str, shape: Sequence[int]) -> Tensor:
    """``[C, H, W]`` or ``[H, W]`` -> RGB uint8; errors give ``shape``, the image's as given."""
    if image.dim() == 2:
        image = image[None]
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        layout = "[H, W, C]" if kind == "array" else "[C, H, W]"
        raise ValueError(
            f"an image {kind} must be {layout} with 1, 3 or 4 channels (or [H, W] grey), "
            f"got shape {tuple(shape)}"
        )
    if min(image.shape[1:]) < 1:
        raise ValueError(f"an image {kind} must not be empty, got shape {tuple(shape)}")
    if image.dtype == torch.bool or image.is_floating_point():
        image = image.float()
        low, high = image.min().item(), image.max().item()
        if low < 0 or high > 1:
            raise ValueError(
                f"a floating-point image {kind} must hold values in [0, 1], got [{low}, {high}]"
            )
        image = (image * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise ValueError(f"an image {kind} must be uint8 or floating point, got {image.dtype}")
    image = image[:3] if image.shape[0] == 4 else image.expand(3, -1, -1)
    return image.contiguous()


def image_list(
    images: ImageInput | Sequence[ImageInput], who: str = "Detector"
) -> tuple[list[Tensor], bool]:
    """One image or a list of them (a 4-D tensor being a list of its images) -> RGB ``uint8``
    images (:func:`to_uint8_image`), and whether one image was given. ``who`` names the caller
    in the error for an empty list."""
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    single = not isinstance(images, (list, tuple))
    pixels = [to_uint8_image(image) for image in ([images] if single else images)]
    if not pixels:
        raise ValueError(f"{who} was given an empty list of images")
    return pixels, single


def resize_image(
    image: Tensor,
    size: int | None = SHORT_SIDE,
    max_size: int = MAX_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """An RGB ``uint8`` ``[3, H, W]`` image as the model takes it: resized as at validation
    (short side ``size``, long side at most ``max_size``, see
    :func:`detrkit.data.resized_shape`; ``size=None`` keeps it as it is), then
    ``(rgb / 255 - mean) / std``, float32."""
    height, width = image.shape[-2:]
    short_side = size or min(height, width)
    max_size = max_size if size else max(height, width)
    config = AugmentationConfig(
        val_size=short_side, max_size=max_size, mean=tuple(mean), std=tuple(std)
    )
    return make_val_transforms(config)(tv_tensors.Image(image)).as_subclass(Tensor)


def prepare_images(
    images: Sequence[Tensor],
    size: int | None = SHORT_SIDE,
    max_size: int = MAX_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[Tensor, Tensor]:
    """RGB ``uint8`` ``[3, H_i, W_i]`` images -> one batch: each :func:`resize_image`, then
    :func:`detrkit.data.pad_images` (``images`` ``[B, 3, H, W]``, padded at the bottom and right
    with zeros, and ``mask`` ``[B, H, W]``, True on padding)."""
    return pad_images([resize_image(image, size, max_size, mean, std) for image in images])
