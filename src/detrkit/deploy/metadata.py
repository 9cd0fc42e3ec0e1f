"""What an exported file records about its model, so that a runtime without detrkit can use it."""

from __future__ import annotations

import json

from detrkit.data.coco_names import class_names_for
from detrkit.data.images import MAX_SIZE, SHORT_SIDE
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.models import ModelConfig, kind_of
from detrkit.models.presets import closest_preset
from detrkit.version import __version__

# How images become the graph's input, for a runtime without detrkit; detrkit.data.images does it.
RESIZE_RULE = (
    "short side to short_side, aspect ratio kept; where the long side would exceed max_size, the "
    "short side becomes round(max_size * short / long) instead; the long side is truncated to "
    "an int; bilinear, antialiased; short_side null: images keep their size"
)
PADDING_RULE = (
    "a batch is padded at the bottom and right with zeros (after normalisation) to its largest "
    "height and width; mask [B, H, W] is True on padding"
)
NO_PADDING_RULE = "no mask input: images are not padded, run them one at a time"


def export_metadata(
    config: ModelConfig,
    input_names: list[str],
    output_names: list[str],
    resize: tuple[int | None, int] = (SHORT_SIDE, MAX_SIZE),
) -> dict[str, str]:
    """String key/value pairs (ONNX metadata_props; JSON in a torch.export archive). Values that
    are not plain text are JSON. ``resize`` is the ``(short side, max size)`` the model is meant
    to see images at (a ``detrkit train`` run's image scale of 800 and 1333)."""
    preset, overrides = closest_preset(config)
    postprocessed = "scores" in output_names
    if postprocessed:
        boxes = "absolute x1, y1, x2, y2 in the pixels of orig_sizes"
    else:
        boxes = "normalised cx, cy, w, h in [0, 1] of the unpadded image"
    metadata = {
        "detrkit_version": __version__,
        "model_type": config.model_type,
        "preset": preset,
        "preset_overrides": json.dumps(overrides),
        "config": json.dumps(config.to_dict()),
        "class_names": json.dumps(class_names_for(config)),
        # The dataset's category id of each class index, or null (the index is the id).
        "category_ids": json.dumps(config.category_ids),
        "resize": json.dumps({"short_side": resize[0], "max_size": resize[1], "rule": RESIZE_RULE}),
        # images = (rgb / 255 - mean) / std, channels first
        "image_mean": json.dumps(list(IMAGENET_MEAN)),
        "image_std": json.dumps(list(IMAGENET_STD)),
        "padding": PADDING_RULE if "mask" in input_names else NO_PADDING_RULE,
        "inputs": json.dumps(input_names),
        "outputs": json.dumps(output_names),
        "boxes": boxes,
        # How pred_logits become scores: a sigmoid per class, or a softmax whose last class is
        # "no object".
        "classification": kind_of(config).classification,
    }
    if "pred_masks" in output_names:
        of = "detection (of its query)" if postprocessed else "query"
        metadata["masks"] = (
            f"pred_masks [B, K, ceil(H/4), ceil(W/4)]: mask logits of each {of} at stride 4 of "
            "the padded input; upsample bilinearly to H x W, keep each image's unpadded part, "
            "then sigmoid > 0.5, resized to the image's own size, is its mask"
        )
        # Panoptic post-processing merges the segments of a stuff class into one.
        metadata["is_thing"] = json.dumps(config.thing_classes())
    return metadata
