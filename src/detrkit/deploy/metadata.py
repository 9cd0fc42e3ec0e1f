"""What an exported file records about its model, so that a runtime without detrkit can use it."""

from __future__ import annotations

import json

from detrkit.data.coco_names import class_names_for
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.models import ModelConfig, kind_of
from detrkit.models.presets import closest_preset
from detrkit.version import __version__


def export_metadata(
    config: ModelConfig, input_names: list[str], output_names: list[str]
) -> dict[str, str]:
    """String key/value pairs (ONNX metadata_props; JSON in a torch.export archive). Values that
    are not plain text are JSON."""
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
        # images = (rgb / 255 - mean) / std, channels first
        "image_mean": json.dumps(list(IMAGENET_MEAN)),
        "image_std": json.dumps(list(IMAGENET_STD)),
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
    return metadata
