"""Detection models: backbone -> position encoding -> transformer -> heads."""

from detrkit.models.config import DETRConfig
from detrkit.models.detr import DETR
from detrkit.models.postprocess import PostProcess
from detrkit.models.presets import PRESETS, available_models, build_config, build_model

__all__ = [
    "DETR",
    "PRESETS",
    "DETRConfig",
    "PostProcess",
    "available_models",
    "build_config",
    "build_model",
]
