"""A picture of a model's predictions on a few validation images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import make_grid

from detrkit.data import collate_fn
from detrkit.data.drawing import draw_detections, draw_masks
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.files import write_atomically
from detrkit.models import PostProcess


@torch.no_grad()
def draw_predictions(
    model: nn.Module,
    dataset,
    path: Path,
    num_images: int = 8,
    threshold: float = 0.3,
    min_side: int = 320,
) -> Path:
    """Draws the detections scoring at least ``threshold`` (with class name and score, and the
    mask of a panoptic model's) on the first ``num_images`` images of ``dataset``, enlarged to at
    least ``min_side`` pixels so that labels stay legible, as one PNG grid.

    Each image runs on its own, as ``detrkit predict`` runs it: in one batch the images would be
    padded to the largest of them, and Deformable DETR's detections depend on that padding."""
    from PIL import Image

    model.eval()
    device = next(model.parameters()).device
    postprocess = PostProcess.for_config(model.config)
    names = model.config.class_names or [str(i) for i in range(model.config.num_classes)]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for index in range(min(num_images, len(dataset))):
        images, mask, targets = collate_fn([dataset[index]])  # [1, 3, H, W], no padding
        outputs = model(images.to(device), mask.to(device))
        sizes = targets[0]["size"][None].to(device)  # [1, 2] height, width
        found = postprocess(outputs, sizes)
        if "pred_masks" in outputs:
            found = postprocess.add_masks(outputs, found, images.shape[-2:], sizes.tolist(), sizes)
        found = found[0]
        pixels = ((images[0] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        keep = found["scores"] >= threshold
        captions = [
            f"{names[int(label)]} {score:.2f}"
            for label, score in zip(found["labels"][keep], found["scores"][keep])
        ]
        if "masks" in found:
            pixels = draw_masks(pixels, found["masks"][keep], found["labels"][keep])
        tiles.append(
            draw_detections(
                pixels, found["boxes"][keep], captions, found["labels"][keep], min_side=min_side
            )
        )
    side = max(max(t.shape[1], t.shape[2]) for t in tiles)
    padded = [
        torch.nn.functional.pad(t, (0, side - t.shape[2], 0, side - t.shape[1])) for t in tiles
    ]
    grid = make_grid(padded, nrow=4, padding=4, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path
