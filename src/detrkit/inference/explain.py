"""Figures of how DETR and Deformable DETR reach their detections.

DETR: for each detected object, the last decoder layer's cross-attention over the image (heads
averaged and per head), and the encoder's self-attention of chosen pixels. Deformable DETR: for
each detected object, its reference point and its sampling points on every level, coloured by
attention weight, for every decoder layer; with box refinement, the box after every layer; and the
encoder's sampling points of chosen pixels.

Every figure function returns a matplotlib ``Figure`` whose artists carry a ``gid`` naming what
they show (``"sampling/ROW/LEVEL"``, ``"attention/mean"``...), so that what is drawn can be checked
against the numbers. Figures are drawn with the Agg renderer and never shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from detrkit.data.drawing import draw_detections
from detrkit.files import existing_results, write_atomically
from detrkit.inference.capture import Internals, SamplingRecord, capture_internals
from detrkit.inference.detector import Detections, Detector, ImageInput, to_uint8_image

PANEL_INCHES = 3.2
POINTS_CMAP = "plasma"  # sampling points, dark (light weight) to yellow (heavy weight)
ATTENTION_CMAP = "inferno"
DISPLAY_PIXELS = 400  # images are subsampled to about this long side in figure panels


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


def _new_figure(rows: int, cols: int, title: str, aspect: float = 1.0) -> tuple[Figure, list]:
    """A grid of panels sized for images ``aspect`` (height / width) tall, axes hidden."""
    panel_height = PANEL_INCHES * min(max(aspect, 0.4), 2.0) + 0.3  # + the panel's title
    figure = Figure(
        figsize=(PANEL_INCHES * cols + 1.0, panel_height * rows + 0.5), layout="constrained"
    )
    figure.suptitle(title, fontsize=11)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, [list(row) for row in axes]


def _show_image(ax, image: Tensor, display_pixels: int = DISPLAY_PIXELS) -> None:
    """The image with axes in its pixel coordinates: x right, y down, pixel i spanning [i, i+1]."""
    height, width = image.shape[-2:]
    # A panel is a few hundred pixels wide: drawing a large photo at full size only costs time.
    step = max(1, max(height, width) // display_pixels)
    shown = image[:, ::step, ::step]
    ax.imshow(shown.permute(1, 2, 0).numpy(), extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)


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


def cxcywh_to_xyxy_pixels(box: Tensor, image_size: Sequence[int]) -> Tensor:
    """A normalised (cx, cy, w, h) box -> absolute (x1, y1, x2, y2) in the image's pixels."""
    height, width = image_size
    cx, cy, w, h = box.tolist()
    return torch.tensor(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    )


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
    image: Tensor, internals: Internals, obj: ExplainedObject, batch: int = 0
) -> Figure:
    """DETR: where an object's query looks in the last decoder layer: heads averaged, then each
    head, as a map over the feature map's cells (``gid`` ``"attention/mean"``,
    ``"attention/head1"``...)."""
    record = internals.decoder_cross_attention[-1]
    height, width = internals.feature_shape
    valid_h, valid_w = _valid_map_shape(internals, batch)
    weights = record.weights[batch, :, obj.query]  # [M, H*W]
    maps = weights.view(-1, height, width)[:, :valid_h, :valid_w]  # [M, h, w] unpadded cells
    panels = [("heads averaged", "attention/mean", maps.mean(0))] + [
        (f"head {m + 1}", f"attention/head{m + 1}", maps[m]) for m in range(len(maps))
    ]
    layers = len(internals.decoder_cross_attention)
    rows, cols = _grid(len(panels), 5)
    figure, axes = _new_figure(
        rows,
        cols,
        f"DETR: what object query {obj.query} ({obj.caption}) attends to in the decoder's last "
        f"cross-attention (layer {layers} of {layers}), over the {height}x{width} feature map; "
        "each panel coloured from 0 to its own maximum",
        image.shape[-2] / image.shape[-1],
    )
    image_size = image.shape[-2:]
    for index, (label, gid, values) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        _show_image(ax, image)
        artist = _overlay(ax, values, image_size, float(values.max()), gid)
        _draw_box(ax, obj.box, "cyan", "box", linewidth=1.5)
        ax.set_title(label, fontsize=9)
        if index == 0:
            mean_artist = artist
    all_axes = [ax for row in axes for ax in row]
    figure.colorbar(mean_artist, ax=all_axes, shrink=0.6, label="weight (heads averaged)")
    return figure


def encoder_attention_figure(
    image: Tensor, internals: Internals, pixels: Sequence[Sequence[float]], batch: int = 0
) -> Figure:
    """DETR: the last encoder layer's self-attention (heads averaged) of the feature-map cell
    under each pixel, over all cells (``gid`` ``"attention/pixel1"``...)."""
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
    for index, (x, y) in enumerate(pixels):
        row, col = pixel_to_cell((x, y), image_size, (valid_h, valid_w))
        weights = record.weights[batch, :, row * width + col].mean(0)  # [H*W]
        values = weights.view(height, width)[:valid_h, :valid_w]
        ax = axes[index // cols][index % cols]
        _show_image(ax, image)
        _overlay(ax, values, image_size, float(values.max()), f"attention/pixel{index + 1}")
        _draw_point(ax, x, y, "cyan", f"pixel/{index + 1}")
        ax.set_title(f"pixel ({x:.0f}, {y:.0f}) = cell ({row}, {col})", fontsize=9)
    return figure


# ---------------------------------------------------------------------------------------------
# Deformable DETR


def sampling_points_figure(
    image: Tensor,
    records: Sequence[SamplingRecord],
    query: int,
    valid_ratios: Tensor,
    title: str,
    row_label: str,
    batch: int = 0,
) -> Figure:
    """One row per attention layer, one column per feature level: the query's reference point
    (``gid`` ``"reference/ROW/LEVEL"``; its reference box too when it has one) and its M x P
    sampling points on that level (``"sampling/ROW/LEVEL"``), coloured by attention weight on one
    scale for the whole figure. Points are in image pixels, as :func:`to_image_pixels` maps them.
    """
    image_size = image.shape[-2:]
    levels = records[0].sampling_locations.shape[3]
    vmax = max(float(r.attention_weights[batch, query].max()) for r in records)
    aspect = image_size[0] / image_size[1]
    figure, axes = _new_figure(len(records), levels, title, aspect)
    scatter = None
    for row, record in enumerate(records):
        shapes = record.spatial_shapes.tolist()
        for level in range(levels):
            ax = axes[row][level]
            _show_image(ax, image)
            ratio = valid_ratios[batch, level]
            reference = record.reference_points[batch, query, level]  # [2] or [4] normalised
            if reference.shape[-1] == 4:  # a box: offsets are scaled by its size
                box = cxcywh_to_xyxy_pixels(reference / ratio.repeat(2).to(reference), image_size)
                _draw_box(ax, box, "cyan", f"reference_box/{row}/{level}", linestyle="--")
            centre = to_image_pixels(reference[:2], ratio, image_size)
            _draw_point(
                ax,
                *centre,
                "cyan",
                f"reference/{row}/{level}",
                zorder=3,  # above the sampling points around it
            )
            points = to_image_pixels(
                record.sampling_locations[batch, query, :, level].reshape(-1, 2), ratio, image_size
            )  # [M * P, 2] pixels
            weights = record.attention_weights[batch, query, :, level].reshape(-1)  # [M * P]
            scatter = ax.scatter(
                points[:, 0].cpu().numpy(),
                points[:, 1].cpu().numpy(),
                c=weights.float().cpu().numpy(),
                cmap=POINTS_CMAP,
                vmin=0.0,
                vmax=vmax,
                s=22,
                edgecolors="white",
                linewidths=0.4,
            )
            scatter.set_gid(f"sampling/{row}/{level}")
            height, width = shapes[level]
            ax.set_title(f"{row_label} {row + 1}, level {level} ({height}x{width})", fontsize=9)
    figure.colorbar(scatter, ax=[ax for row in axes for ax in row], shrink=0.6, label="weight")
    return figure


def box_refinement_figure(
    image: Tensor, internals: Internals, obj: ExplainedObject, batch: int = 0
) -> Figure:
    """Deformable DETR with box refinement: the query's first reference (a point, or the
    proposal box for two-stage; ``gid`` ``"initial"``) and the box after every decoder layer
    (``"box/1"``...), the last being the detection."""
    image_size = image.shape[-2:]
    references = internals.layer_references[:, batch, obj.query]  # [L, 4] normalised cx, cy, w, h
    figure, axes = _new_figure(
        1,
        1,
        f"Deformable DETR: box refinement of query {obj.query} ({obj.caption}), "
        f"layer by layer ({len(references)} decoder layers)",
    )
    figure.set_size_inches(8, 8 * min(max(image_size[0] / image_size[1], 0.4), 2.0) + 0.8)
    ax = axes[0][0]
    _show_image(ax, image, display_pixels=800)
    initial = internals.initial_reference[batch, obj.query]
    if initial.shape[-1] == 4:
        _draw_box(
            ax,
            cxcywh_to_xyxy_pixels(initial, image_size),
            "white",
            "initial",
            linestyle=":",
            linewidth=1.5,
            label="encoder proposal",
        )
    else:
        centre = to_image_pixels(initial, torch.ones(2), image_size)
        _draw_point(ax, *centre, "white", "initial", label="reference point")
    colors = _layer_colors(len(references))
    for layer, box in enumerate(references):
        _draw_box(
            ax,
            cxcywh_to_xyxy_pixels(box, image_size),
            colors[layer],
            f"box/{layer + 1}",
            linewidth=1.2 + layer * 0.4,
            label=f"after layer {layer + 1}",
        )
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    return figure


def _layer_colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, count - 1)) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The whole explanation of one image


def select_objects(found: Detections, max_objects: int) -> list[ExplainedObject]:
    """The best ``max_objects`` detections (one per query: a query's best class)."""
    objects, seen = [], set()
    for box, score, name, query in zip(
        found.boxes, found.scores.tolist(), found.names, found.queries.tolist()
    ):
        if query in seen:
            continue
        seen.add(query)
        objects.append(ExplainedObject(len(objects) + 1, query, name, score, box))
        if len(objects) == max_objects:
            break
    return objects


def _save(figure: Figure, path: Path) -> Path:
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def explain_figures(
    detector: Detector,
    image: ImageInput,
    pixels: Sequence[Sequence[float]] | None = None,
    max_objects: int = 5,
) -> tuple[list[ExplainedObject], dict[str, Figure | Tensor]]:
    """Runs ``detector`` on one image while capturing the model's internals and returns the
    explained objects and every figure by file name (``detections.png`` is an image tensor)."""
    pixels_u8 = to_uint8_image(image)
    image_size = tuple(pixels_u8.shape[-2:])
    if pixels is not None:
        check_pixels(pixels, image_size)
    with torch.no_grad(), capture_internals(detector.model) as internals:
        (found,), _ = detector.detect([pixels_u8])
    objects = select_objects(found, max_objects)
    pixels = list(pixels) if pixels is not None else auto_pixels(objects, image_size)

    figures: dict[str, Figure | Tensor] = {
        "detections.png": draw_detections(
            pixels_u8,
            torch.stack([obj.box for obj in objects]) if objects else torch.zeros(0, 4),
            [obj.caption for obj in objects],
            torch.arange(len(objects)),
            min_side=480,
        )
    }
    if internals.model_type == "detr":
        for obj in objects:
            figures[f"object{obj.number}_cross_attention.png"] = cross_attention_figure(
                pixels_u8, internals, obj
            )
        if pixels:
            figures["encoder_self_attention.png"] = encoder_attention_figure(
                pixels_u8, internals, pixels
            )
        return objects, figures

    for obj in objects:
        figures[f"object{obj.number}_sampling_points.png"] = sampling_points_figure(
            pixels_u8,
            internals.decoder_sampling,
            obj.query,
            internals.valid_ratios,
            f"Deformable DETR: where object query {obj.query} ({obj.caption}) samples in each "
            "decoder layer (+ reference point, dots sampling points coloured by weight)",
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
    return objects, figures


def explain(
    detector: Detector,
    image: ImageInput,
    out: str | Path,
    pixels: Sequence[Sequence[float]] | None = None,
    max_objects: int = 5,
    overwrite: bool = False,
) -> tuple[list[ExplainedObject], list[Path]]:
    """Writes the explanation figures of one image as PNG files into ``out``; returns the
    explained objects and the files written. Figures there already are an error (naming
    them) unless ``overwrite``."""
    out = Path(out)
    objects, figures = explain_figures(detector, image, pixels, max_objects)
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
    return objects, written
