"""``detrkit explore``: one forward pass as a self-contained interactive HTML page.

The page holds everything it shows: the image (JPEG), the detections, the model's data flow
(:mod:`detrkit.inference.trace`) and what :func:`~detrkit.inference.capture_internals` recorded,
packed as gzip-compressed typed arrays in base64 that the browser unpacks with its built-in
``DecompressionStream``; the script and styles are inline, nothing is fetched. Numbers a view
shows as numbers (decoder sampling locations and weights, boxes, reference points) are stored
exactly as float32; those only drawn as colours or positions of thousands of points are
quantised, and the page says where:

- Deformable DETR's encoder: sampling locations as uint16 steps of their range, weights as
  uint8 steps of 1/255, for every cell of the coarse levels and every k-th cell of the fine ones
  (a budget of :data:`ENCODER_QUERY_BUDGET` queries in all).
- DETR: cross-attention weights as uint16 steps of each row's maximum; encoder self-attention,
  heads averaged, as uint8 steps of each row's maximum.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from detrkit.data.images import ImageInput, to_uint8_image
from detrkit.files import existing_results, write_atomically
from detrkit.inference.capture import Internals, capture_internals
from detrkit.inference.detector import Detections, Detector
from detrkit.inference.trace import REPEATED_STAGES, FlowNode, decoder_references, record_flow
from detrkit.models import DeformableDETRConfig, DETRSegmentationConfig, kind_of

ENCODER_QUERY_BUDGET = 5000  # Deformable DETR encoder queries stored for pixel selection
IMAGE_LONG_SIDE = 1333  # the page's copy of the image is at most this long
JPEG_QUALITY = 88


# ---------------------------------------------------------------------------------------------
# Packing arrays for the page


def pack(array: np.ndarray | Tensor, **extra) -> dict:
    """A typed array for the page: dtype, shape and gzip-compressed little-endian bytes in base64."""
    if isinstance(array, Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    dtype = {"float32": "<f4", "uint16": "<u2", "uint8": "u1", "int32": "<i4"}[str(array.dtype)]
    data = gzip.compress(array.astype(dtype).tobytes(), compresslevel=6, mtime=0)
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(data).decode("ascii"),
        **extra,
    }


def quantise_rows(values: Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative ``values`` ``[..., N]`` as integer steps of each row's maximum: returns the
    steps (uint8 or uint16) and the maxima (float32, ``[...]``); value = step / top * maximum."""
    top = (1 << bits) - 1
    maxima = values.amax(-1).clamp(min=1e-30)
    steps = torch.round(values / maxima[..., None] * top)
    dtype = np.uint8 if bits == 8 else np.uint16
    return steps.cpu().numpy().astype(dtype), maxima.float().cpu().numpy()


def quantise_range(values: Tensor) -> tuple[np.ndarray, float, float]:
    """``values`` as uint16 steps of their range: value = low + step / 65535 * (high - low)."""
    low, high = float(values.min()), float(values.max())
    span = max(high - low, 1e-30)
    steps = torch.round((values - low) / span * 65535)
    return steps.cpu().numpy().astype(np.uint16), low, high


def dequantise_range(steps: np.ndarray, low: float, high: float) -> np.ndarray:
    """Inverse of :func:`quantise_range` (as the page computes it)."""
    return low + steps.astype(np.float64) / 65535 * (high - low)


# ---------------------------------------------------------------------------------------------
# What the page shows


def image_data_url(image: Tensor) -> tuple[str, float]:
    """The RGB ``uint8`` ``[3, H, W]`` image as a JPEG data URL, at most :data:`IMAGE_LONG_SIDE`
    long, and the scale it was stored at."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    scale = min(1.0, IMAGE_LONG_SIDE / max(picture.size))
    if scale < 1:
        picture = picture.resize(
            (round(picture.width * scale), round(picture.height * scale)), Image.BICUBIC
        )
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), scale


def variant_of(config) -> str:
    """A name for the variant a config describes, e.g. "Deformable DETR, two-stage"."""
    if not isinstance(config, DeformableDETRConfig):
        masks = (
            ", panoptic: with the mask head" if isinstance(config, DETRSegmentationConfig) else ""
        )
        return f"DETR ({config.backbone}{', DC5' if config.dilation else ''}{masks})"
    parts = [
        f"{config.num_feature_levels}-level" if config.num_feature_levels > 1 else "single-scale"
    ]
    if config.with_box_refine:
        parts.append("iterative box refinement")
    if config.two_stage:
        parts.append("two-stage")
    return f"Deformable DETR ({config.backbone}, {', '.join(parts)})"


SAMPLING_FORMULAS = {
    "points": "sampling_locations = reference_points + sampling_offsets / offset_normalizer "
    "(point references: offsets in pixels of each level, divided by the level's (W, H))",
    "boxes": "sampling_locations = centre + sampling_offsets / n_points * box size * 0.5 "
    "(box references: offsets scaled by the reference box)",
}


def _graph(nodes: Sequence[FlowNode]) -> list[dict]:
    graph = []
    for node in nodes:
        graph.append(
            {
                "key": node.key,
                "stage": node.stage,
                "label": node.label,
                "note": node.note,
                "code": asdict(node.code),
                "inputs": list(node.inputs),
                "repeated": node.stage in REPEATED_STAGES,
                "calls": [asdict(call) for call in node.calls],
            }
        )
    return graph


def _layer_boxes(outputs: dict) -> Tensor:
    """Every decoder layer's boxes ``[L, Q, 4]`` normalised cx, cy, w, h (image 0)."""
    boxes = [aux["pred_boxes"][0] for aux in outputs.get("aux_outputs", [])]
    return torch.stack([*boxes, outputs["pred_boxes"][0]]).float()


def one_per_query(found: Detections) -> list[dict]:
    """The detections, best first, one per query: its best class, and the other classes that
    passed the threshold in ``also`` (Deformable DETR scores every class of a query)."""
    by_query: dict[int, dict] = {}
    for query, name, score, box in zip(
        found.queries.tolist(), found.names, found.scores.tolist(), found.boxes
    ):
        if query in by_query:
            by_query[query]["also"].append([name, score])
        else:
            by_query[query] = {
                "query": query,
                "label": name,
                "score": score,
                "box": [float(v) for v in box],
                "also": [],
            }
    return list(by_query.values())


def encoder_cells(spatial_shapes: Sequence[Sequence[int]], budget: int) -> list[int]:
    """The step (in cells) at which every level's encoder queries are kept: 1 everywhere when
    all fit in ``budget``, else the level with the most kept cells steps up first."""
    steps = [1] * len(spatial_shapes)

    def kept(level: int) -> int:
        height, width = spatial_shapes[level]
        return math.ceil(height / steps[level]) * math.ceil(width / steps[level])

    while sum(kept(level) for level in range(len(steps))) > budget:
        steps[max(range(len(steps)), key=kept)] += 1
    return steps


def kept_encoder_queries(
    spatial_shapes: Sequence[Sequence[int]], level_start_index: Sequence[int], steps: Sequence[int]
) -> np.ndarray:
    """The flattened indices of the encoder queries kept at ``steps``, level by level."""
    kept = []
    for (height, width), start, step in zip(spatial_shapes, level_start_index, steps):
        rows = np.arange(0, height, step)
        cols = np.arange(0, width, step)
        kept.append(start + (rows[:, None] * width + cols[None, :]).reshape(-1))
    return np.concatenate(kept).astype(np.int32)


def _deformable_data(internals: Internals) -> dict:
    first = internals.encoder_sampling[0]
    shapes = first.spatial_shapes.tolist()
    starts = first.level_start_index.tolist()
    _, _, heads, levels, points, _ = first.sampling_locations.shape
    decoder = internals.decoder_sampling
    steps = encoder_cells(shapes, ENCODER_QUERY_BUDGET)
    kept = kept_encoder_queries(shapes, starts, steps)
    index = torch.from_numpy(kept).long()
    locations = torch.stack([r.sampling_locations[0, index] for r in internals.encoder_sampling])
    weights = torch.stack([r.attention_weights[0, index] for r in internals.encoder_sampling])
    steps_u16, low, high = quantise_range(locations.float())
    weight_steps = torch.round(weights.float() * 255).cpu().numpy().astype(np.uint8)
    return {
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "valid_ratios": internals.valid_ratios[0].float().tolist(),  # [L, 2] (w, h)
        "heads": heads,
        "levels": levels,
        "points": points,
        "decoder": {
            # [layers, Q, L, 4]: what each layer's attention received (x valid ratios)
            # (box refinement: layer 1 has points, the later layers boxes; points get w = h = 0)
            "references": pack(torch.stack([as_box(r.reference_points[0]) for r in decoder])),
            # [layers, Q, M, L, P, 2] normalised (x, y); [layers, Q, M, L, P]
            "locations": pack(torch.stack([r.sampling_locations[0] for r in decoder]).float()),
            "weights": pack(torch.stack([r.attention_weights[0] for r in decoder]).float()),
            "initial": pack(internals.initial_reference[0].float()),  # [Q, 2 or 4]
            "references_after": pack(internals.layer_references[:, 0].float()),  # [L, Q, 2|4]
            "formula": decoder_formula_per_layer(decoder),
        },
        "encoder": {
            "steps": steps,
            "queries": pack(kept),  # [N] flattened indices
            "references": pack(first.reference_points[0, index].float()),  # [N, L, 2]
            # [layers, N, M, L, P, 2] uint16 steps of [low, high]
            "locations": pack(steps_u16, low=low, high=high),
            "weights": pack(weight_steps),  # [layers, N, M, L, P] uint8 steps of 1/255
        },
    }


def as_box(reference: Tensor) -> Tensor:
    """Reference points ``[..., 2]`` or boxes ``[..., 4]`` as float32 ``[..., 4]`` (points get a
    zero size)."""
    reference = reference.float()
    if reference.shape[-1] == 4:
        return reference
    return torch.cat([reference, torch.zeros_like(reference)], -1)


def decoder_formula_per_layer(records) -> list[str]:
    """Which sampling formula each decoder layer used: "points" or "boxes"."""
    return ["boxes" if r.reference_points.shape[-1] == 4 else "points" for r in records]


def _detr_data(internals: Internals) -> dict:
    height, width = internals.feature_shape
    valid = (height, width)
    if internals.padding_mask is not None:
        unpadded = ~internals.padding_mask[0].view(height, width)
        valid = (int(unpadded[:, 0].sum()), int(unpadded[0, :].sum()))
    cross = torch.stack([r.weights[0] for r in internals.decoder_cross_attention])  # [L, M, Q, HW]
    cross_steps, cross_max = quantise_rows(cross.float(), 16)
    encoder = torch.stack(
        [r.weights[0].mean(0) for r in internals.encoder_attention]
    )  # [L, HW, HW]
    encoder_steps, encoder_max = quantise_rows(encoder.float(), 8)
    return {
        "feature_shape": [height, width],
        "valid_shape": list(valid),
        "heads": cross.shape[1],
        # [layers, M, Q, H*W] uint16 steps of each row's maximum, and the maxima [layers, M, Q]
        "cross": pack(cross_steps, maxima=pack(cross_max)),
        # [layers, H*W, H*W] heads averaged, uint8 steps of each row's maximum
        "encoder": pack(encoder_steps, maxima=pack(encoder_max)),
    }


def explore_data(
    detector: Detector, image: ImageInput, source: str, threshold: float | None = None
) -> dict:
    """Runs ``detector`` once on ``image`` and returns everything the page shows."""
    pixels = to_uint8_image(image)
    height, width = pixels.shape[-2:]
    model = detector.model
    kind = kind_of(model.config)
    with (
        torch.no_grad(),
        capture_internals(model) as internals,
        record_flow(model) as nodes,
    ):
        # The page draws a query's mask from pred_masks itself.
        (found,), outputs = detector.detect([pixels], threshold, masks=False)
    # Every query's best class and its score (image 0, last layer), as post-processing scores.
    scores, labels = detector.postprocess.class_probabilities(outputs["pred_logits"])[0].max(-1)
    best = int(scores.argmax())
    url, scale = image_data_url(pixels)
    config = model.config
    data = {
        "source": source,
        "variant": variant_of(config),
        "kind": kind.name,
        "config": {
            "hidden_dim": config.hidden_dim,
            "nheads": config.nheads,
            "num_queries": config.num_queries,
            "enc_layers": config.enc_layers,
            "dec_layers": config.dec_layers,
            "num_classes": config.num_classes,
        },
        "image": {"src": url, "width": width, "height": height, "stored_scale": scale},
        "input_size": list(nodes[0].calls[0].shape[-2:]),  # the resized, padded batch
        "threshold": detector.threshold if threshold is None else threshold,
        "class_names": list(detector.class_names),
        "detections": one_per_query(found),
        "pairs": len(found),  # (query, class) pairs at the threshold
        "best": {
            "query": best,
            "score": float(scores[best]),
            "label": detector.class_names[int(labels[best])],
        },
        "queries": {
            "scores": pack(scores),  # [Q] best score of every query
            "labels": pack(labels.int()),  # [Q] its class index
            "boxes": pack(_layer_boxes(outputs)),  # [layers, Q, 4] normalised cx, cy, w, h
        },
        "graph": _graph(nodes),
    }
    if "pred_masks" in outputs:
        # [Q, H/4, W/4] mask probabilities of image 0, in steps of 1/255 (drawn as an overlay).
        probabilities = outputs["pred_masks"][0].float().sigmoid()
        data["masks"] = pack(torch.round(probabilities * 255).cpu().numpy().astype(np.uint8))
    if not internals.deformable:
        data["detr"] = _detr_data(internals)
    else:
        data["deformable"] = _deformable_data(internals)
        data["formulas"] = {
            name: SAMPLING_FORMULAS[name]
            for name in sorted(set(data["deformable"]["decoder"]["formula"]) | {"points"})
        }
        data["decoder_references"] = decoder_references(config)
    return data


def _asset(name: str) -> str:
    return resources.files("detrkit.inference").joinpath("explore_page", name).read_text("utf-8")


def render_page(data: dict) -> str:
    """The whole page: the template with its script, styles and ``data`` inline."""
    # "<" escaped: nothing in the data can end the script element that holds it.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return (
        _asset("page.html")
        .replace("/*STYLE*/", _asset("page.css"))
        .replace("/*SCRIPT*/", _asset("page.js"))
        .replace("/*DATA*/", payload)
    )


def explore(
    detector: Detector,
    image: ImageInput,
    out: str | Path,
    source: str,
    threshold: float | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict]:
    """Writes the page of one forward pass of ``detector`` on ``image`` to ``out`` (an existing
    file there is an error unless ``overwrite``); returns the path and the page's data."""
    out = Path(out)
    existing_results([out], f"--out {out}", overwrite)
    data = explore_data(detector, image, source, threshold)
    page = render_page(data)
    write_atomically(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out, data
