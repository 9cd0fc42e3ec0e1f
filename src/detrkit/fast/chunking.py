"""Running a batch of images a few at a time, for CPUs.

Every stage of DETR and Deformable DETR in eval mode works on each image alone (convolutions, norms
per token, attention within an image), so a batch run in chunks of images gives the same outputs.
On a CPU it is faster for large images: one 800x1066 image's feature maps and token sequences
(about 18 MB each) stay in the last-level cache from one layer to the next, a batch of eight's do
not. Small images are better run together, so chunks are sized by their pixels, and by the bytes of
a pixel's activations: in bf16 twice the pixels make as many bytes as in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# Pixels per forward on a CPU in fp32. Measured on a 2-core VM with a 32 MB last-level cache,
# batches of 8 against chunks: at 800x1066 and 400x533 chunks of one image were 5-25% faster, at
# 300x400 and 200x266 the whole batch was 7-30% faster. One 800x1066 image is 852,800 pixels.
# In bf16 (Xeon with AMX, freed memory kept for reuse) two 800x1066 images per forward were 11%
# faster than one: the same bytes per forward, and a forward's fixed cost shared by two images.
CPU_PIXELS_PER_FORWARD = 1_000_000


def cpu_pixels_per_forward(dtype: torch.dtype) -> int:
    """Pixels per forward on a CPU for activations of ``dtype``: :data:`CPU_PIXELS_PER_FORWARD`
    in fp32, scaled to the same bytes for other dtypes."""
    return CPU_PIXELS_PER_FORWARD * torch.float32.itemsize // dtype.itemsize


def forward_in_chunks(
    forward: Callable[[Tensor, Tensor | None], dict],
    images: Tensor,
    mask: Tensor | None,
    images_per_chunk: int,
) -> dict:
    """``forward(images, mask)`` over consecutive chunks of at most ``images_per_chunk`` images,
    its outputs (tensors with the batch first, in dicts and lists) concatenated along the batch."""
    if images_per_chunk < 1:
        raise ValueError(f"images_per_chunk must be at least 1, got {images_per_chunk}")
    chunks = images.split(images_per_chunk)
    masks = [None] * len(chunks) if mask is None else mask.split(images_per_chunk)
    return _concatenate([forward(chunk, chunk_mask) for chunk, chunk_mask in zip(chunks, masks)])


def _concatenate(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concatenate(list(items)) for items in zip(*parts))
    if first is None:
        return None
    raise TypeError(f"cannot concatenate model outputs of type {type(first).__name__}")


def images_per_chunk(pixels_per_forward: int | None, images: Tensor) -> int | None:
    """How many of ``images`` to run at a time on a CPU so that a forward sees at most
    ``pixels_per_forward`` pixels (but at least one image); None when the batch runs whole."""
    if pixels_per_forward is None or images.device.type != "cpu":
        return None
    chunk = max(1, pixels_per_forward // (images.shape[-2] * images.shape[-1]))
    return chunk if images.shape[0] > chunk else None


class ChunkedBatches:
    """Mixed into a detector's class: on a CPU, a batch runs :func:`cpu_pixels_per_forward`
    pixels of the model's dtype at a time (at least one image)."""

    def forward(self, images: Tensor, mask: Tensor | None = None) -> dict:
        # The parameters' dtype is the activations': the input is cast by the first layer.
        dtype = next(self.parameters()).dtype
        chunk = images_per_chunk(cpu_pixels_per_forward(dtype), images)
        if chunk is None:
            return super().forward(images, mask)
        return forward_in_chunks(super().forward, images, mask, chunk)


@functools.cache
def chunked(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` running its batches in chunks (one class per detector class)."""
    return type(f"Chunked{cls.__name__}", (ChunkedBatches, cls), {"reference_class": cls})
