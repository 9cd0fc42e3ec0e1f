"""The table of named model presets and ``build_model``, the one way to create a model."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from detrkit.models.config import (
    DeformableDETRConfig,
    DETRConfig,
    DETRSegmentationConfig,
    ModelConfig,
    check_known_fields,
)
from detrkit.models.kinds import kind_of

# The digits DETRs' shared fields (detr_digits, detr_digits_panoptic).
_DETR_DIGITS = dict(
    backbone="resnet18",
    backbone_norm="batch",
    hidden_dim=128,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=512,
    num_queries=20,
)

PRESETS: dict[str, ModelConfig] = {
    "detr_r50": DETRConfig(backbone="resnet50"),
    "detr_r50_dc5": DETRConfig(backbone="resnet50", dilation=True),
    "detr_r101": DETRConfig(backbone="resnet101"),
    "detr_r101_dc5": DETRConfig(backbone="resnet101", dilation=True),
    "deformable_detr": DeformableDETRConfig(),
    "deformable_detr_single_scale": DeformableDETRConfig(num_feature_levels=1),
    "deformable_detr_refine": DeformableDETRConfig(with_box_refine=True),
    "deformable_detr_two_stage": DeformableDETRConfig(with_box_refine=True, two_stage=True),
    # The panoptic models of the original: COCO's 250 thing and stuff ids.
    "detr_r50_panoptic": DETRSegmentationConfig(backbone="resnet50", num_classes=250),
    "detr_r50_dc5_panoptic": DETRSegmentationConfig(
        backbone="resnet50", dilation=True, num_classes=250
    ),
    "detr_r101_panoptic": DETRSegmentationConfig(backbone="resnet101", num_classes=250),
    # Small models for the built-in digits dataset and CPUs: a ResNet-18 trained from scratch
    # (no pre-trained weights are downloaded), a narrow transformer, few queries.
    "detr_digits": DETRConfig(**_DETR_DIGITS, nheads=4, num_classes=10),
    # detr_digits with the mask head, for the panoptic digits (the canvas as an 11th, stuff
    # class); 8 heads, as the mask head's group norms need hidden_dim + nheads a multiple of 8.
    "detr_digits_panoptic": DETRSegmentationConfig(**_DETR_DIGITS, nheads=8, num_classes=11),
    "deformable_detr_digits": DeformableDETRConfig(
        backbone="resnet18",
        backbone_norm="batch",
        hidden_dim=128,
        nheads=4,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=512,
        num_queries=50,  # as `make demo` trains it (docs/demo.md: AP 0.287 against 0.272 with 20)
        num_classes=10,
        with_box_refine=True,
    ),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(PRESETS)


def build_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config with ``overrides`` applied (unknown fields are an error)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return override_config(PRESETS[name], name, **overrides)


def override_config(config: ModelConfig, source: str, **overrides: Any) -> ModelConfig:
    """``config`` with ``overrides`` applied; unknown fields are an error naming ``source`` (the
    preset or checkpoint the config came from)."""
    check_known_fields(type(config), overrides, f"unknown options for {source}")
    return dataclasses.replace(config, **overrides)


def model_from_config(config: ModelConfig) -> nn.Module:
    """Instantiates the model a config describes."""
    return kind_of(config).model_class(config)


def build_model(name: str | ModelConfig, **overrides: Any) -> nn.Module:
    """Creates a randomly initialised model from a preset name (or a config) and overrides.

    >>> model = build_model("detr_r50", num_classes=20)
    """
    if isinstance(name, str):
        config = build_config(name, **overrides)
    else:
        config = dataclasses.replace(name, **overrides)
    return model_from_config(config)


def closest_preset(config: ModelConfig) -> tuple[str, dict]:
    """The preset of the config's kind that differs from it in the fewest fields, and those
    fields' values (class names aside): ``("detr_r50", {"num_classes": 21})``."""
    fields = [
        f.name
        for f in dataclasses.fields(config)
        if f.name not in ("class_names", "category_ids", "is_thing")
    ]
    best_name, best_overrides = "", {}
    for name, preset in sorted(PRESETS.items()):
        if type(preset) is not type(config):
            continue
        overrides = {
            f: getattr(config, f) for f in fields if getattr(config, f) != getattr(preset, f)
        }
        if not best_name or len(overrides) < len(best_overrides):
            best_name, best_overrides = name, overrides
    return best_name, best_overrides
