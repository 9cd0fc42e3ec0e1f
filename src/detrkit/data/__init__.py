"""Data: datasets, augmentations and batching."""

from detrkit.data.batching import pad_images

__all__ = ["pad_images"]
