"""Figures of how DETR and Deformable DETR reach their detections.

DETR: for each detected object, the last decoder layer's cross-attention over the image (heads
averaged and per head), and the encoder's self-attention of chosen pixels. Deformable DETR: for
each detected object, its reference point and its sampling points on every level, coloured by
attention weight, for every decoder layer; with box refinement, the box after every layer; and the
encoder's sampling points of chosen pixels.

Every figure function returns a matplotlib ``Figure`` whose artists carry a ``gid`` naming what
they show (``"sampling/ROW/LEVEL/head1"``, ``"attention/mean"``...), so that what is drawn can be
checked against the numbers, and whose legend (``gid`` ``"legend"``) says what every mark means.
Panels whose marks cover a small part of the image zoom to them. Figures are drawn with the Agg
renderer and never shown.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from detrkit.data.drawing import draw_detections
from detrkit.data.images import ImageInput, to_uint8_image
from detrkit.files import existing_results, write_atomically
from detrkit.inference.capture import Internals, SamplingRecord, capture_internals
from detrkit.inference.detector import MASK_THRESHOLD, Detections, Detector

PANEL_INCHES = 3.2
POINTS_CMAP = "plasma"  # sampling points, dark (light weight) to yellow (heavy weight)
ATTENTION_CMAP = "inferno"
MASK_CMAP = "viridis"  # a panoptic model's query masks, probability 0 to 1
DISPLAY_PIXELS = 400  # images are subsampled to about this long side in figure panels
# Sampling points: one marker shape per attention head (8 in the presets), reused past 14; no
# "P" (a filled plus), which would look like the reference point's "+".
HEAD_MARKERS = ("o", "s", "^", "v", "D", "X", "*", "p", "h", "<", ">", "d", "H", "8")
LAYER_LINESTYLES = ("-", "--", "-.", ":")  # box refinement: one per decoder layer, in turn
# A panel zooms when its marks (plus a margin of ZOOM_MARGIN of their extent) fit in
# ZOOM_AT_MOST of the image's width and height; never closer than MAX_ZOOM.
ZOOM_AT_MOST, ZOOM_MARGIN, MAX_ZOOM = 0.5, 0.25, 8.0


@dataclass
class ExplainedObject:
    """One detection to explain: its number in the figures and where it came from."""

    number: int  # 1-based, as in detections.png and the file names
    query: int  # the object query that produced it
    name: str
    score: float
    box: Tensor  # [4] absolute x1, y1, x2, y2

    @property
    def caption(self) -> str:
        return f"#{self.number} {self.name} {self.score:.2f}"


# ---------------------------------------------------------------------------------------------
# Coordinates


def to_image_pixels(points: Tensor, valid_ratio: Tensor, image_size: Sequence[int]) -> Tensor:
    """Normalised (x, y) on a level's (padded) map -> pixels of the input image.

    ``points`` ``[..., 2]``; ``valid_ratio`` ``[2]`` the unpadded fraction (w, h) of the level;
    ``image_size`` the image's (height, width). The model's coordinates count the unpadded area
    as the image, so dividing by the valid ratio gives fractions of the image.
    """
    height, width = image_size
    scale = torch.tensor([width, height], dtype=points.dtype, device=points.device)
    return points / valid_ratio.to(points) * scale


def pixel_to_cell(
    pixel: Sequence[float], image_size: Sequence[int], valid_shape: Sequence[int]
) -> tuple[int, int]:
    """The (row, column) of the feature-map cell that covers image pixel (x, y), for a map whose
    unpadded part is ``valid_shape`` (H, W) cells spread over the whole image."""
    x, y = pixel
    height, width = image_size
    rows, cols = valid_shape
    return min(int(y / height * rows), rows - 1), min(int(x / width * cols), cols - 1)


def check_pixels(pixels: Sequence[Sequence[float]], image_size: Sequence[int]) -> None:
    """Raises ValueError naming the first pixel (x, y) that is not inside the image."""
    height, width = image_size
    for x, y in pixels:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"pixel ({x}, {y}) is outside the image, which is {width} x {height} (x, y)"
            )


def auto_pixels(objects: Sequence[ExplainedObject], image_size: Sequence[int]) -> list:
    """Pixels to show the encoder's attention of: the centres of up to 3 detected objects, or
    the image's centre and two points on its diagonal when nothing was detected."""
    if objects:
        return [
            (float(obj.box[0] + obj.box[2]) / 2, float(obj.box[1] + obj.box[3]) / 2)
            for obj in objects[:3]
        ]
    height, width = image_size
    return [(width * f, height * f) for f in (0.5, 0.25, 0.75)]


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def _grid(panels: int, max_cols: int) -> tuple[int, int]:
    cols = min(panels, max_cols)
    return math.ceil(panels / cols), cols


def _new_figure(
    rows: int, cols: int, title: str, aspect: float = 1.0, panel_inches: float = PANEL_INCHES
) -> tuple[Figure, list]:
    """A grid of panels ``panel_inches`` wide for images ``aspect`` (height / width) tall, axes
    hidden, with room below for the legend."""
    panel_height = panel_inches * min(max(aspect, 0.4), 2.0) + 0.3  # + the panel's title
    width = max(panel_inches * cols + 1.0, 6.0)  # legends need room under a single panel
    figure = Figure(figsize=(width, panel_height * rows + 1.4), layout="constrained")
    figure.suptitle("\n".join(textwrap.wrap(title, round(11 * width))), fontsize=11)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, [list(row) for row in axes]


def _legend(figure: Figure, handles: list, cols: int = 3) -> None:
    """The key to every mark of the figure, below the panels."""
    legend = figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(cols, len(handles)),
        fontsize=8,
        facecolor="0.35",  # grey, so that cyan and white marks show as they do on the image
        labelcolor="white",
        framealpha=1.0,
    )
    legend.set_gid("legend")


def _point_handle(label: str, color: str = "cyan") -> Line2D:
    style = {"marker": "+", "markersize": 11, "markeredgewidth": 2, "ls": "none"}
    return Line2D([], [], color=color, label=label, **style)


def _box_handle(label: str, color: str = "cyan", **style) -> Patch:
    return Patch(facecolor="none", edgecolor=color, label=label, **style)


def zoom_region(
    points: Tensor, image_size: Sequence[int]
) -> tuple[float, float, float, float] | None:
    """Where a panel showing ``points`` (``[N, 2]`` image pixels x, y) zooms to: (x1, y1, x2,
    y2) around them plus a margin, with the image's proportions, or None when that would cover
    more than :data:`ZOOM_AT_MOST` of the image's width (the panel then shows the whole image).
    The region lies inside the image where the points allow."""
    height, width = image_size
    low, high = points.min(0).values.tolist(), points.max(0).values.tolist()
    margin = max(ZOOM_MARGIN * max(high[0] - low[0], high[1] - low[1]), 0.03 * max(image_size))
    x1, y1, x2, y2 = low[0] - margin, low[1] - margin, high[0] + margin, high[1] + margin
    # The image's proportions, so that the panel keeps its size; never more than MAX_ZOOM.
    span_x = max(x2 - x1, (y2 - y1) * width / height, width / MAX_ZOOM)
    if span_x > ZOOM_AT_MOST * width:
        return None
    span_y = span_x * height / width
    region = []
    for lo, hi, span, size, p_lo, p_hi in (
        (x1, x2, span_x, width, low[0], high[0]),
        (y1, y2, span_y, height, low[1], high[1]),
    ):
        start = (lo + hi - span) / 2
        # Slide the region into the image rather than show blank margins, unless the points
        # themselves are outside it.
        start = max(start, min(0.0, p_lo - margin))
        start = min(start, max(float(size), p_hi + margin) - span)
        region.append((start, start + span))
    (x1, x2), (y1, y2) = region
    return x1, y1, x2, y2


def _zoom_note(region: tuple[float, ...] | None, image_size: Sequence[int]) -> str:
    if region is None:
        return ""
    return f", zoomed {image_size[1] / (region[2] - region[0]):.1f}x"


def _off_image_note(
    points: Tensor, region: tuple[float, ...] | None, image_size: Sequence[int]
) -> str:
    """How many points a whole-image panel cannot show (a zoomed one shows them all)."""
    height, width = image_size
    x, y = points.unbind(-1)
    off = int(((x < 0) | (x > width) | (y < 0) | (y > height)).sum())
    return f", {off} points off the image" if region is None and off else ""


def _show_image(
    ax, image: Tensor, region: Sequence[float] | None = None, display_pixels: int = DISPLAY_PIXELS
) -> None:
    """The image with axes in its pixel coordinates: x right, y down, pixel i spanning [i, i+1];
    the axes limits are ``region`` (x1, y1, x2, y2) when given, else the whole image."""
    height, width = image.shape[-2:]
    x1, y1, x2, y2 = (0, 0, width, height) if region is None else region
    # Only the part in view is drawn, and a panel is a few hundred pixels wide: drawing a large
    # photo at full size only costs time.
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    if right > left and bottom > top:
        crop = image[:, top:bottom, left:right]
        step = max(1, max(crop.shape[-2:]) // display_pixels)
        shown = crop[:, ::step, ::step]
        ax.imshow(shown.permute(1, 2, 0).numpy(), extent=(left, right, bottom, top))
    ax.set_xlim(x1, x2)
    ax.set_ylim(y2, y1)


def _draw_box(ax, box: Sequence[float], color: str, gid: str, **style) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    patch = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, **style)
    patch.set_gid(gid)
    ax.add_patch(patch)
    return patch


def _draw_point(ax, x: float, y: float, color: str, gid: str, **style):
    """A large "+" at pixel ``(x, y)``: a query pixel or a reference point."""
    marker = ax.scatter([float(x)], [float(y)], marker="+", s=160, c=color, linewidths=2, **style)
    marker.set_gid(gid)
    return marker


def _overlay(ax, values: Tensor, image_size: Sequence[int], vmax: float, gid: str):
    """A map of values over the whole image, one square per feature-map cell (no smoothing)."""
    height, width = image_size
    artist = ax.imshow(
        values.float().cpu().numpy(),
        extent=(0, width, height, 0),
        cmap=ATTENTION_CMAP,
        alpha=0.65,
        vmin=0.0,
        vmax=vmax,
        interpolation="nearest",
    )
    artist.set_gid(gid)
    return artist


def _relative_colorbar(figure: Figure, axes: list) -> None:
    """One colour scale for panels each coloured from 0 to its own maximum (in its title)."""
    scale = ScalarMappable(Normalize(0.0, 1.0), ATTENTION_CMAP)
    figure.colorbar(
        scale, ax=axes, shrink=0.6, label="attention weight / the panel's maximum (in its title)"
    )


def _overlay_handle(label: str) -> Patch:
    return Patch(facecolor=colormaps[ATTENTION_CMAP](0.75), alpha=0.65, label=label)


def cxcywh_to_xyxy_pixels(box: Tensor, image_size: Sequence[int]) -> Tensor:
    """A normalised (cx, cy, w, h) box -> absolute (x1, y1, x2, y2) in the image's pixels."""
    height, width = image_size
    cx, cy, w, h = box.tolist()
    return torch.tensor(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    )


def _corners(box: Tensor) -> Tensor:
    """The (x1, y1) and (x2, y2) corners of an xyxy box, as [2, 2] points."""
    return box.view(2, 2)


# ---------------------------------------------------------------------------------------------
# Detections


def nothing_found_note(threshold: float, highest: ExplainedObject | None) -> str:
    """ "scored at least T (the highest score was S, 'name', query Q)": why nothing was
    explained, and how far the best candidate was."""
    if highest is None:
        return f"scored at least {threshold} (the model gave no candidates)"
    return (
        f"scored at least {threshold} (the highest score was {highest.score:.2f}, "
        f"{highest.name!r}, query {highest.query})"
    )


def nothing_found_figure(
    image: Tensor, threshold: float, highest: ExplainedObject | None
) -> Figure:
    """The image when no detection passed the threshold: its title says the highest score, and
    the candidate that scored it is drawn as a dashed box (``gid`` ``"highest"``)."""
    aspect = image.shape[-2] / image.shape[-1]
    title = f"Nothing {nothing_found_note(threshold, highest)}"
    figure, axes = _new_figure(1, 1, title, aspect, panel_inches=5.0)
    ax = axes[0][0]
    _show_image(ax, image, display_pixels=800)
    handles = []
    if highest is not None:
        _draw_box(ax, highest.box, "cyan", "highest", linestyle="--", linewidth=1.5)
        handles.append(
            _box_handle(
                f"dashed box: the highest-scoring candidate ({highest.name} "
                f"{highest.score:.2f}), below the threshold",
                linestyle="--",
            )
        )
    else:
        handles.append(Patch(facecolor="none", edgecolor="none", label="no candidates"))
    _legend(figure, handles, cols=1)
    return figure


# ---------------------------------------------------------------------------------------------
# DETR


def _valid_map_shape(internals: Internals, batch: int) -> tuple[int, int]:
    """The unpadded part (H, W) of DETR's feature map for image ``batch``."""
    height, width = internals.feature_shape
    if internals.padding_mask is None:
        return height, width
    valid = ~internals.padding_mask[batch].view(height, width)
    return int(valid[:, 0].sum()), int(valid[0, :].sum())


def cross_attention_figure(
    image: Tensor,
    internals: Internals,
    obj: ExplainedObject,
    batch: int = 0,
    mask: Tensor | None = None,
) -> Figure:
    """DETR: where an object's query looks in the last decoder layer: heads averaged, then each
    head, as a map over the feature map's cells (``gid`` ``"attention/mean"``,
    ``"attention/head1"``...), each coloured from 0 to its own maximum; the cyan box is the
    detection (``"box"``). A panoptic model's query ``mask`` (``[H, W]`` probabilities at the
    image's size, the sigmoid of its mask logits) comes first, beside them (``"mask"``, on a
    0-to-1 scale; its outline at 0.5, the detection's mask, ``"mask/outline"``)."""
    record = internals.decoder_cross_attention[-1]
    height, width = internals.feature_shape
    valid_h, valid_w = _valid_map_shape(internals, batch)
    weights = record.weights[batch, :, obj.query]  # [M, H*W]
    maps = weights.view(-1, height, width)[:, :valid_h, :valid_w]  # [M, h, w] unpadded cells
    panels = [("heads averaged", "attention/mean", maps.mean(0))] + [
        (f"head {m + 1}", f"attention/head{m + 1}", maps[m]) for m in range(len(maps))
    ]
    layers = len(internals.decoder_cross_attention)
    offset = 0 if mask is None else 1  # the mask panel first
    rows, cols = _grid(len(panels) + offset, 5)
    figure, axes = _new_figure(
        rows,
        cols,
        f"DETR: what object query {obj.query} ({obj.caption}) attends to in the decoder's last "
        f"cross-attention (layer {layers} of {layers}), over the {height}x{width} feature map",
        image.shape[-2] / image.shape[-1],
    )
    image_size = image.shape[-2:]
    all_axes = [ax for row in axes for ax in row]
    handles = [_box_handle(f"cyan box: the detection ({obj.caption})", linewidth=1.5)]
    if mask is not None:
        ax = all_axes[0]
        _show_image(ax, image)
        # Subsampled as the image is: a panel is a few hundred pixels wide.
        step = max(1, max(image_size) // DISPLAY_PIXELS)
        values = mask.float().cpu()[::step, ::step]
        shown = ax.imshow(
            values.numpy(),
            extent=(0, image_size[1], image_size[0], 0),
            cmap=MASK_CMAP,
            alpha=0.6,
            vmin=0.0,
            vmax=1.0,
        )
        shown.set_gid("mask")
        if float(values.max()) > MASK_THRESHOLD > float(values.min()):
            # At the centres of the (subsampled) pixels, in the image's coordinates.
            rows = (torch.arange(values.shape[0]) * step + step / 2).numpy()
            cols = (torch.arange(values.shape[1]) * step + step / 2).numpy()
            outline = ax.contour(
                cols, rows, values.numpy(), levels=[MASK_THRESHOLD], colors="white", linewidths=1
            )
            outline.set_gid("mask/outline")
        _draw_box(ax, obj.box, "cyan", "box", linewidth=1.5)
        ax.set_title(f"mask (max {float(mask.max()):.2f})", fontsize=9)
        figure.colorbar(shown, ax=ax, shrink=0.8, label="mask probability")
        handles.append(
            Patch(
                facecolor=colormaps[MASK_CMAP](0.75),
                alpha=0.6,
                label=f"first panel: the query's mask probability (the sigmoid of its mask "
                f"logits); white line: {MASK_THRESHOLD}, the detection's mask",
            )
        )
    for index, (label, gid, values) in enumerate(panels):
        ax = all_axes[index + offset]
        _show_image(ax, image)
        peak = float(values.max())
        _overlay(ax, values, image_size, peak, gid)
        _draw_box(ax, obj.box, "cyan", "box", linewidth=1.5)
        ax.set_title(f"{label} (max {peak:.3f})", fontsize=9)
    _relative_colorbar(figure, all_axes[offset:])
    handles.append(
        _overlay_handle(
            "overlay: the query's attention weight on each feature-map cell "
            f"({valid_h}x{valid_w} squares; each head's weights sum to 1)"
        )
    )
    _legend(figure, handles, cols=1)
    return figure


def encoder_attention_figure(
    image: Tensor, internals: Internals, pixels: Sequence[Sequence[float]], batch: int = 0
) -> Figure:
    """DETR: the last encoder layer's self-attention (heads averaged) of the feature-map cell
    under each pixel, over all cells (``gid`` ``"attention/pixel1"``...); the pixel is a "+"
    (``"pixel/1"``) and its cell a dotted square (``"cell/1"``)."""
    record = internals.encoder_attention[-1]
    height, width = internals.feature_shape
    valid_h, valid_w = _valid_map_shape(internals, batch)
    image_size = image.shape[-2:]
    layers = len(internals.encoder_attention)
    rows, cols = _grid(len(pixels), 4)
    figure, axes = _new_figure(
        rows,
        cols,
        f"DETR: encoder self-attention (layer {layers} of {layers}, heads averaged) of the "
        f"marked pixels' cells, over the {height}x{width} feature map",
        image.shape[-2] / image.shape[-1],
    )
    cell_w, cell_h = image_size[1] / valid_w, image_size[0] / valid_h
    for index, (x, y) in enumerate(pixels):
        row, col = pixel_to_cell((x, y), image_size, (valid_h, valid_w))
        weights = record.weights[batch, :, row * width + col].mean(0)  # [H*W]
        values = weights.view(height, width)[:valid_h, :valid_w]
        ax = axes[index // cols][index % cols]
        _show_image(ax, image)
        peak = float(values.max())
        _overlay(ax, values, image_size, peak, f"attention/pixel{index + 1}")
        cell = (col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)
        _draw_box(ax, cell, "cyan", f"cell/{index + 1}", linestyle=":", linewidth=1.5)
        _draw_point(ax, x, y, "cyan", f"pixel/{index + 1}")
        ax.set_title(f"pixel ({x:.0f}, {y:.0f}) = cell ({row}, {col}), max {peak:.3f}", fontsize=9)
    _relative_colorbar(figure, [ax for row in axes for ax in row])
    _legend(
        figure,
        [
            _point_handle("+: the chosen pixel"),
            _box_handle("dotted square: its feature-map cell (the query)", linestyle=":"),
            _overlay_handle("overlay: that cell's attention weight on every cell"),
        ],
    )
    return figure


# ---------------------------------------------------------------------------------------------
# Deformable DETR


def head_marker(head: int) -> str:
    """The marker shape of attention head ``head`` (0-based) in sampling-point figures."""
    return HEAD_MARKERS[head % len(HEAD_MARKERS)]


def sampling_points_figure(
    image: Tensor,
    records: Sequence[SamplingRecord],
    query: int,
    valid_ratios: Tensor,
    title: str,
    row_label: str,
    batch: int = 0,
) -> Figure:
    """One row per attention layer, one column per feature level: the query's reference point, a
    "+" (``gid`` ``"reference/ROW/LEVEL"``; its reference box too when it has one, dashed,
    ``"reference_box/ROW/LEVEL"``) and its P sampling points of each head on that level
    (``"sampling/ROW/LEVEL/headH"``, H from 1), one marker shape per head, coloured by attention
    weight on one scale for the whole figure. Points are in image pixels, as
    :func:`to_image_pixels` maps them. A panel whose marks cover a small part of the image zooms
    to them (:func:`zoom_region`; "zoomed" in its title).
    """
    image_size = image.shape[-2:]
    heads, levels = records[0].sampling_locations.shape[2:4]
    vmax = max(float(r.attention_weights[batch, query].max()) for r in records)
    aspect = image_size[0] / image_size[1]
    figure, axes = _new_figure(len(records), levels, title, aspect)
    has_box = records[0].reference_points.shape[-1] == 4
    scatter = None
    for row, record in enumerate(records):
        shapes = record.spatial_shapes.tolist()
        for level in range(levels):
            ax = axes[row][level]
            ratio = valid_ratios[batch, level]
            # On the CPU, where the figure's numbers go (records may be on a GPU).
            reference = record.reference_points[batch, query, level].cpu()  # [2] or [4]
            centre = to_image_pixels(reference[:2], ratio, image_size)
            points = to_image_pixels(
                record.sampling_locations[batch, query, :, level].cpu(), ratio, image_size
            )  # [M, P, 2] pixels
            weights = record.attention_weights[batch, query, :, level].cpu()  # [M, P]
            marks = [centre[None], points.reshape(-1, 2)]
            if has_box:  # a box: offsets are scaled by its size
                box = cxcywh_to_xyxy_pixels(reference / ratio.repeat(2).to(reference), image_size)
                marks.append(_corners(box))
            region = zoom_region(torch.cat(marks).float(), image_size)
            _show_image(ax, image, region)
            if has_box:
                _draw_box(ax, box, "cyan", f"reference_box/{row}/{level}", linestyle="--")
            for head in range(heads):
                scatter = ax.scatter(
                    points[head, :, 0].numpy(),
                    points[head, :, 1].numpy(),
                    c=weights[head].float().numpy(),
                    cmap=POINTS_CMAP,
                    vmin=0.0,
                    vmax=vmax,
                    marker=head_marker(head),
                    s=30,
                    edgecolors="white",
                    linewidths=0.5,
                )
                scatter.set_gid(f"sampling/{row}/{level}/head{head + 1}")
            _draw_point(
                ax,
                *centre,
                "cyan",
                f"reference/{row}/{level}",
                zorder=3,  # above the sampling points around it
            )
            height, width = shapes[level]
            ax.set_title(
                f"{row_label} {row + 1}, level {level} ({height}x{width})"
                + _zoom_note(region, image_size)
                + _off_image_note(points.reshape(-1, 2), region, image_size),
                fontsize=9,
            )
    figure.colorbar(
        scatter,
        ax=[ax for row in axes for ax in row],
        shrink=0.6,
        label="attention weight (each head's sum to 1)",
    )
    handles = [_point_handle("+: reference point (where the offsets start)")]
    if has_box:
        handles.append(
            _box_handle("dashed box: reference box (offsets are scaled by its size)", ls="--")
        )
    handles += [
        Line2D(
            [],
            [],
            marker=head_marker(m),
            color="0.8",
            markeredgecolor="white",
            ls="none",
            label=f"head {m + 1}",
        )
        for m in range(heads)
    ]
    # Two rows below a wide figure (the reference marks, then the heads, column by column); two
    # columns below a narrow one (single scale).
    _legend(figure, handles, cols=math.ceil(len(handles) / 2) if levels >= 3 else 2)
    return figure


def box_refinement_figure(
    image: Tensor, internals: Internals, obj: ExplainedObject, batch: int = 0
) -> Figure:
    """Deformable DETR with box refinement: the query's first reference (a point, or the
    proposal box for two-stage; ``gid`` ``"initial"``) and the box after every decoder layer
    (``"box/1"``...), the last being the detection. So that boxes on top of one another stay
    apart, each layer has its own colour (viridis, light = later), line style and width, and a
    small tag with its number spread along its top edge; the legend says how far each layer moved
    the box. The panel zooms to the union of the boxes when they cover a small part of the image.
    """
    image_size = image.shape[-2:]
    references = internals.layer_references[:, batch, obj.query]  # [L, 4] normalised cx, cy, w, h
    boxes = [cxcywh_to_xyxy_pixels(box, image_size) for box in references]
    initial = internals.initial_reference[batch, obj.query].cpu()
    if initial.shape[-1] == 4:
        start = cxcywh_to_xyxy_pixels(initial, image_size)
        start_marks = _corners(start)
    else:
        start = None
        start_marks = to_image_pixels(initial, torch.ones(2), image_size)[None]
    region = zoom_region(torch.cat([start_marks, *map(_corners, boxes)]), image_size)
    figure, axes = _new_figure(
        1,
        1,
        f"Deformable DETR: box refinement of query {obj.query} ({obj.caption}), "
        f"layer by layer ({len(references)} decoder layers){_zoom_note(region, image_size)}",
        image_size[0] / image_size[1],
        panel_inches=7.0,
    )
    ax = axes[0][0]
    _show_image(ax, image, region, display_pixels=800)
    if start is not None:
        _draw_box(ax, start, "white", "initial", linestyle=":", linewidth=1.5)
        handles = [_box_handle("dotted white box: the encoder's proposal", "white", ls=":")]
    else:
        _draw_point(ax, *start_marks[0], "white", "initial")
        handles = [_point_handle("white +: the first reference point", "white")]
    colors = _layer_colors(len(boxes))
    previous = start
    for layer, box in enumerate(boxes):
        style = {
            "linestyle": LAYER_LINESTYLES[layer % len(LAYER_LINESTYLES)],
            "linewidth": 1.2 + layer * 0.5,
        }
        # Later boxes are wider and drawn below earlier ones, which stay visible on top of them.
        zorder = 2 - layer / len(boxes)
        _draw_box(ax, box, colors[layer], f"box/{layer + 1}", zorder=zorder, **style)
        x1, y1, x2, _ = box.tolist()
        # Tags spread along the top edge, so that they stay readable when boxes coincide.
        tag = ax.text(
            x1 + (x2 - x1) * (layer + 0.5) / len(boxes),
            y1,
            str(layer + 1),
            color="white" if layer < len(boxes) / 2 else "black",  # on viridis' dark / light
            fontsize=7,
            ha="center",
            va="bottom",
            bbox={"boxstyle": "square,pad=0.15", "facecolor": colors[layer], "linewidth": 0},
            clip_on=True,
        )
        tag.set_gid(f"tag/{layer + 1}")
        label = f"{layer + 1}: after layer {layer + 1}"
        if previous is not None:
            label += f", corners moved {float((box - previous).abs().max()):.1f} px"
        if layer == len(boxes) - 1:
            label += " (the detection)"
        handles.append(_box_handle(label, colors[layer], **style))
        previous = box
    _legend(figure, handles, cols=2)
    return figure


def _layer_colors(count: int) -> list:
    cmap = colormaps["viridis"]
    return [cmap(i / max(1, count - 1)) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The whole explanation of one image


def select_objects(
    found: Detections, max_objects: int, threshold: float = 0.0
) -> list[ExplainedObject]:
    """The best ``max_objects`` detections scoring at least ``threshold`` (one per query: a
    query's best class)."""
    objects, seen = [], set()
    for box, score, name, query in zip(
        found.boxes, found.scores.tolist(), found.names, found.queries.tolist()
    ):
        if score < threshold or len(objects) == max_objects:
            break  # detections come best first
        if query in seen:
            continue
        seen.add(query)
        objects.append(ExplainedObject(len(objects) + 1, query, name, score, box))
    return objects


def highest_candidate(found: Detections) -> ExplainedObject | None:
    """The best of all of a model's candidates, whatever their score (``number`` 0), or None
    when there are none; ``found`` as :meth:`Detector.detect` gives it at threshold 0."""
    if len(found) == 0:
        return None
    return ExplainedObject(
        0, int(found.queries[0]), found.names[0], float(found.scores[0]), found.boxes[0]
    )


def _save(figure: Figure, path: Path) -> Path:
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def explain_figures(
    detector: Detector,
    image: ImageInput,
    pixels: Sequence[Sequence[float]] | None = None,
    max_objects: int = 5,
) -> tuple[list[ExplainedObject], dict[str, Figure | Tensor], ExplainedObject | None]:
    """Runs ``detector`` on one image while capturing the model's internals and returns the
    explained objects, every figure by file name (``detections.png`` is an image tensor, or a
    figure saying the highest score when nothing passed the threshold) and the highest-scoring
    candidate (:func:`highest_candidate`)."""
    pixels_u8 = to_uint8_image(image)
    image_size = tuple(pixels_u8.shape[-2:])
    if pixels is not None:
        check_pixels(pixels, image_size)
    with torch.no_grad(), capture_internals(detector.model) as internals:
        run = detector.run([pixels_u8])
    # Every candidate, so that the highest score can be told when none passes the threshold;
    # the masks of the explained ones alone.
    (found,) = detector.detections(run, threshold=0.0, masks=False)
    objects = select_objects(found, max_objects, detector.threshold)
    highest = highest_candidate(found)
    pixels = list(pixels) if pixels is not None else auto_pixels(objects, image_size)

    figures: dict[str, Figure | Tensor] = {
        "detections.png": draw_detections(
            pixels_u8,
            torch.stack([obj.box for obj in objects]),
            [obj.caption for obj in objects],
            torch.arange(len(objects)),
            min_side=480,
        )
        if objects
        else nothing_found_figure(pixels_u8, detector.threshold, highest)
    }
    if not internals.deformable:
        queries = torch.tensor([obj.query for obj in objects], dtype=torch.long)
        masks = (
            detector.query_masks(run, 0, queries, probabilities=True)
            if run.has_masks and objects
            else [None] * len(objects)
        )
        for obj, mask in zip(objects, masks):
            figures[f"object{obj.number}_cross_attention.png"] = cross_attention_figure(
                pixels_u8, internals, obj, mask=mask
            )
        if pixels:
            figures["encoder_self_attention.png"] = encoder_attention_figure(
                pixels_u8, internals, pixels
            )
        return objects, figures, highest

    for obj in objects:
        figures[f"object{obj.number}_sampling_points.png"] = sampling_points_figure(
            pixels_u8,
            internals.decoder_sampling,
            obj.query,
            internals.valid_ratios,
            f"Deformable DETR: where object query {obj.query} ({obj.caption}) samples in each "
            "decoder layer, on every feature level",
            "decoder layer",
        )
        if internals.layer_references.shape[-1] == 4:  # box refinement: every layer moves it
            figures[f"object{obj.number}_box_refinement.png"] = box_refinement_figure(
                pixels_u8, internals, obj
            )
    first = internals.encoder_sampling[0]
    finest_h, finest_w = first.spatial_shapes[0].tolist()
    ratio = internals.valid_ratios[0, 0]
    valid_shape = (round(float(ratio[1]) * finest_h), round(float(ratio[0]) * finest_w))
    for index, pixel in enumerate(pixels):
        row, col = pixel_to_cell(pixel, image_size, valid_shape)
        query = int(first.level_start_index[0]) + row * finest_w + col
        figures[f"encoder_pixel{index + 1}_sampling_points.png"] = sampling_points_figure(
            pixels_u8,
            internals.encoder_sampling,
            query,
            internals.valid_ratios,
            f"Deformable DETR: where the encoder query of pixel ({pixel[0]:.0f}, {pixel[1]:.0f}) "
            f"(level 0 cell ({row}, {col})) samples in each encoder layer",
            "encoder layer",
        )
    return objects, figures, highest


def explain(
    detector: Detector,
    image: ImageInput,
    out: str | Path,
    pixels: Sequence[Sequence[float]] | None = None,
    max_objects: int = 5,
    overwrite: bool = False,
) -> tuple[list[ExplainedObject], list[Path], ExplainedObject | None]:
    """Writes the explanation figures of one image as PNG files into ``out``; returns the
    explained objects, the files written and the highest-scoring candidate (what to say when
    nothing passed the threshold). Figures there already are an error (naming them) unless
    ``overwrite``."""
    out = Path(out)
    objects, figures, highest = explain_figures(detector, image, pixels, max_objects)
    existing_results([out / name for name in figures], f"--out {out}", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        if isinstance(figure, Tensor):
            from PIL import Image

            picture = Image.fromarray(figure.permute(1, 2, 0).numpy())
            write_atomically(out / name, lambda tmp, p=picture: p.save(tmp, format="PNG"))
            written.append(out / name)
        else:
            written.append(_save(figure, out / name))
    return objects, written, highest
