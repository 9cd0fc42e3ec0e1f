"""Boxes, captions and masks drawn on an image, shared by training pictures, predict and
explain."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

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
    colors = _colors(len(boxes), labels)
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


def draw_masks(
    image: Tensor, masks: Tensor, labels: Tensor | None = None, alpha: float = 0.5
) -> Tensor:
    """Draws binary masks over an image, each in the colour :func:`draw_detections` gives its
    box (by label), ``alpha`` opaque; later masks over earlier ones. Draw the boxes after, on top.

    Args:
        image: ``uint8`` ``[3, H, W]``.
        masks: ``[K, H, W]`` bool, ``image``'s size.
        labels: ``[K]`` class indices choosing the colours (None: one colour).

    Returns:
        ``uint8`` ``[3, H, W]``.
    """
    if len(masks) == 0:
        return image
    colors = _colors(len(masks), labels)
    return draw_segmentation_masks(
        image.cpu(), masks.detach().bool().cpu(), alpha=alpha, colors=colors
    )


def _colors(count: int, labels: Tensor | None) -> list[str]:
    """The colour of each of ``count`` boxes or masks: by label, or one colour without labels."""
    if labels is None:
        return [PALETTE[2]] * count
    return [PALETTE[int(label) % len(PALETTE)] for label in labels]


def _text_color(background: str) -> str:
    """Black on light colours, white on dark ones (by perceived luminance)."""
    red, green, blue = (int(background[i : i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else "white"
