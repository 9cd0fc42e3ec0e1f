"""Detection models: backbone -> position encoding -> transformer -> heads."""

from detrkit.models.config import (
    DeformableDETRConfig,
    DETRConfig,
    DETRSegmentationConfig,
    ModelConfig,
)
from detrkit.models.deformable_detr import DeformableDETR
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.detr import DETR
from detrkit.models.kinds import KINDS, ModelKind, kind_of
from detrkit.models.postprocess import PostProcess
from detrkit.models.presets import (
    PRESETS,
    available_models,
    build_config,
    build_model,
    model_from_config,
)
from detrkit.models.segmentation import DETRSegmentation

__all__ = [
    "DETR",
    "KINDS",
    "PRESETS",
    "DETRConfig",
    "DETRSegmentation",
    "DETRSegmentationConfig",
    "DeformableDETR",
    "DeformableDETRConfig",
    "DenoisingQueries",
    "ModelConfig",
    "ModelKind",
    "PostProcess",
    "available_models",
    "build_config",
    "build_model",
    "kind_of",
    "model_from_config",
]
