"""The kinds of model detrkit builds, and the facts that each kind fixes.

A kind is named by its config's ``model_type``. Code above ``models`` that differs by kind reads
the kind's facts from here (``kind_of(config).classification``) or keys a table of its own by
``kind.name`` (training recipes, checkpoint converters, inspection hooks): a new kind is one row
of :data:`KINDS`, and ``tests/test_kinds.py`` names every such table that still lacks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from detrkit.models.config import (
    DeformableDETRConfig,
    DETRConfig,
    DETRSegmentationConfig,
    ModelConfig,
)
from detrkit.models.deformable_detr import DeformableDETR
from detrkit.models.detr import DETR
from detrkit.models.segmentation import DETRSegmentation

Classification = Literal["softmax", "sigmoid"]
CLASSIFICATIONS: tuple[Classification, ...] = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelKind:
    """One kind of detector: its config and model classes, and ``classification``, how its
    ``pred_logits`` become class scores: ``"softmax"`` over the classes and a last "no object"
    logit, or ``"sigmoid"``, an independent probability per class (no "no object" logit)."""

    config_class: type[ModelConfig]
    model_class: type[nn.Module]
    classification: Classification

    def __post_init__(self) -> None:
        if not self.config_class.model_type:
            raise ValueError(f"{self.config_class.__name__} sets no model_type")
        if self.classification not in CLASSIFICATIONS:
            raise ValueError(
                f"classification must be one of {CLASSIFICATIONS}, got {self.classification!r}"
            )

    @property
    def name(self) -> str:
        """The ``model_type`` that its configs and checkpoints record, e.g. ``"detr"``."""
        return self.config_class.model_type


KINDS: dict[str, ModelKind] = {
    kind.name: kind
    for kind in (
        ModelKind(DETRConfig, DETR, "softmax"),
        ModelKind(DeformableDETRConfig, DeformableDETR, "sigmoid"),
        ModelKind(DETRSegmentationConfig, DETRSegmentation, "softmax"),
    )
}


def kind_of(config: ModelConfig | type[ModelConfig] | str) -> ModelKind:
    """The kind of a config, a config class or a ``model_type``: ValueError for a name that
    is no kind's, TypeError for a config class that belongs to no kind."""
    if isinstance(config, str):
        if config not in KINDS:
            raise ValueError(f"unknown model_type {config!r}; known: {', '.join(KINDS)}")
        return KINDS[config]
    cls = config if isinstance(config, type) else type(config)
    kind = KINDS.get(getattr(cls, "model_type", ""))
    # A subclass that keeps its parent's model_type is of the parent's kind.
    if kind is None or not issubclass(cls, kind.config_class):
        raise TypeError(f"{cls.__name__} is the config of no model kind ({', '.join(KINDS)})")
    return kind
