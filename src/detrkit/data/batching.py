"""Batching differently sized images: pad to the largest and mark the padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pads ``[3, H_i, W_i]`` images at the bottom and right into one batch.

    Returns ``images`` ``[B, 3, H, W]`` (zeros in the padding) and ``mask`` ``[B, H, W]``, True on
    padding, as the models take them.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for i, image in enumerate(images):
        if image.dim() != 3:
            raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected [C, H, W]")
        if image.shape[0] != images[0].shape[0] or image.dtype != images[0].dtype:
            raise ValueError(
                f"image {i} ({image.shape[0]} channels, {image.dtype}) differs from image 0 "
                f"({images[0].shape[0]} channels, {images[0].dtype})"
            )
    channels = images[0].shape[0]
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for image, padded, image_mask in zip(images, batch, mask):
        padded[:, : image.shape[1], : image.shape[2]].copy_(image)
        image_mask[: image.shape[1], : image.shape[2]] = False
    return batch, mask


def unpadded_sizes(mask: Tensor) -> list[tuple[int, int]]:
    """Each image's ``(h, w)`` in a batch that :func:`pad_images` padded, read off its ``mask``
    ``[B, H, W]`` (True on padding, which is at the bottom and right)."""
    valid = ~mask
    return [(int(v[:, 0].sum()), int(v[0, :].sum())) for v in valid]


def collate_fn(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Batches ``(image, target)`` samples for a DataLoader: ``images`` ``[B, 3, H, W]`` and
    ``mask`` ``[B, H, W]`` from :func:`pad_images`, and the targets as a list."""
    if len(batch) == 0:
        raise ValueError("collate_fn needs at least one sample")
    images, targets = zip(*batch)
    padded, mask = pad_images(images)
    return padded, mask, list(targets)
