"""A picture of a model's predictions on a few validation images."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, make_grid

from detrkit.data import collate_fn
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
    """Draws the detections scoring at least ``threshold`` (with class name and score) on the
    first ``num_images`` images of ``dataset``, enlarged to at least ``min_side`` pixels so that
    labels stay legible, as one PNG grid."""
    from PIL import Image

    model.eval()
    device = next(model.parameters()).device
    samples = [dataset[i] for i in range(min(num_images, len(dataset)))]
    images, mask, targets = collate_fn(samples)
    with torch.no_grad():
        outputs = model(images.to(device), mask.to(device))
    sizes = torch.stack([t["size"] for t in targets]).to(device)
    detections = PostProcess.for_config(model.config)(outputs, sizes)
    names = model.config.class_names or [str(i) for i in range(model.config.num_classes)]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tiles = []
    for image, target, found in zip(images, targets, detections):
        height, width = target["size"].tolist()
        pixels = ((image[:, :height, :width] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        keep = found["scores"] >= threshold
        captions = [
            f"{names[int(label)]} {score:.2f}"
            for label, score in zip(found["labels"][keep], found["scores"][keep])
        ]
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


# Box colours by label: matplotlib's "tab10", distinct and readable on photographs.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    captions: Sequence[str],
    labels: Tensor | None = None,
    min_side: int = 0,
) -> Tensor:
    """Draws boxes with their captions on an image; the one drawing routine of detrkit.

    Args:
        image: ``uint8`` ``[3, H, W]``.
        boxes: ``[K, 4]`` absolute (x1, y1, x2, y2) in ``image``'s pixels.
        captions: K texts, e.g. "cat 0.93".
        labels: ``[K]`` class indices choosing the colours (None: one colour).
        min_side: small images are enlarged by a whole factor until their long side reaches
            this, so that captions stay legible.

    Returns:
        ``uint8`` ``[3, H * z, W * z]`` with ``z`` the enlargement factor (1 for large images).
    """
    from matplotlib import font_manager

    height, width = image.shape[-2:]
    zoom = max(1, -(-min_side // max(height, width)))  # ceil
    if zoom > 1:
        image = image.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    if len(boxes) == 0:
        return image
    if labels is None:
        colors = [PALETTE[2]] * len(boxes)
    else:
        colors = [PALETTE[int(label) % len(PALETTE)] for label in labels]
    # Text and lines grow with the picture: about 1/50 of its long side, never under 14 px.
    font_size = max(14, round(max(image.shape[-2:]) / 50))
    # Captions on a filled background in the box's colour, black or white, whichever contrasts
    # (where torchvision has fill_labels; older versions draw the text in the box's colour).
    caption_style = (
        {"fill_labels": True, "label_colors": [_text_color(color) for color in colors]}
        if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters
        else {}
    )
    return draw_bounding_boxes(
        image,
        boxes.detach().float().cpu() * zoom,
        list(captions),
        colors=colors,
        width=max(2, font_size // 7),
        # torchvision's built-in font is tiny; matplotlib ships a TrueType one.
        font=font_manager.findfont("DejaVu Sans"),
        font_size=font_size,
        **caption_style,
    )


def _text_color(background: str) -> str:
    """Black on light colours, white on dark ones (by perceived luminance)."""
    red, green, blue = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else "white"
