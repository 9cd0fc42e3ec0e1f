"""The table of model kinds: its lookups, and that every per-kind table above models covers it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from detrkit.checkpoints.huggingface import RENAMES
from detrkit.checkpoints.native import config_from_dict
from detrkit.checkpoints.official import CONFIG_READERS
from detrkit.deploy.metadata import export_metadata
from detrkit.engine.config import RECIPES, TrainConfig
from detrkit.inference.capture import HOOKS
from detrkit.inference.trace import BOX_LINES, FLOWS, HEAD_LINES, HEAD_METHODS
from detrkit.loss.criterion import CLASS_LOSSES, build_criterion
from detrkit.models import (
    DETR,
    KINDS,
    PRESETS,
    DeformableDETR,
    DeformableDETRConfig,
    DETRConfig,
    DETRSegmentation,
    DETRSegmentationConfig,
    ModelConfig,
    ModelKind,
    PostProcess,
    build_config,
    kind_of,
    model_from_config,
)
from detrkit.models.backbone import RESNET_CHANNELS
from detrkit.models.config import BACKBONES
from detrkit.models.kinds import CLASSIFICATIONS

# Tables above models keyed by kind name: a new kind needs a row in each.
BY_KIND = {
    "engine.config.RECIPES": RECIPES,
    "checkpoints.official.CONFIG_READERS": CONFIG_READERS,
    "checkpoints.huggingface.RENAMES": RENAMES,
    "inference.capture.HOOKS": HOOKS,
    "inference.trace.FLOWS": FLOWS,
}
# Tables keyed by a kind's classification.
BY_CLASSIFICATION = {
    "loss.criterion.CLASS_LOSSES": CLASS_LOSSES,
    "inference.trace.HEAD_LINES": HEAD_LINES,
    "inference.trace.BOX_LINES": BOX_LINES,
    "inference.trace.HEAD_METHODS": HEAD_METHODS,
}


@pytest.mark.parametrize("table", sorted(BY_KIND))
def test_every_kind_has_a_row(table):
    assert set(BY_KIND[table]) == set(KINDS)


@pytest.mark.parametrize("table", sorted(BY_CLASSIFICATION))
def test_every_classification_has_a_row(table):
    assert set(BY_CLASSIFICATION[table]) == set(CLASSIFICATIONS)


def test_the_kinds():
    assert {
        name: (k.config_class, k.model_class, k.classification) for name, k in KINDS.items()
    } == {
        "detr": (DETRConfig, DETR, "softmax"),
        "deformable_detr": (DeformableDETRConfig, DeformableDETR, "sigmoid"),
        "detr_segmentation": (DETRSegmentationConfig, DETRSegmentation, "softmax"),
    }
    for name, kind in KINDS.items():
        assert kind.name == name == kind.config_class.model_type


def test_kind_of_takes_configs_classes_and_names():
    kind = KINDS["deformable_detr"]
    assert kind_of(DeformableDETRConfig()) is kind
    assert kind_of(DeformableDETRConfig) is kind
    assert kind_of("deformable_detr") is kind
    with pytest.raises(ValueError, match="unknown model_type 'yolo'; known: detr, deformable_detr"):
        kind_of("yolo")
    with pytest.raises(TypeError, match="ModelConfig is the config of no model kind"):
        kind_of(ModelConfig())
    with pytest.raises(TypeError, match="NoneType"):
        kind_of(None)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_kind_decides_post_processing_loss_and_metadata(preset):
    config = PRESETS[preset]
    classification = kind_of(config).classification
    assert PostProcess.for_config(config).classification == classification
    assert build_criterion(config).classification == CLASS_LOSSES[classification]
    metadata = export_metadata(config, ["images"], ["pred_logits", "pred_boxes"])
    assert metadata["classification"] == classification
    assert metadata["model_type"] == kind_of(config).name


@dataclass
class ToyConfig(DETRConfig):
    """A kind that is not in detrkit, to show that one row of KINDS makes it usable."""

    model_type: ClassVar[str] = "toy_detr"


def test_a_new_kind_is_one_row(monkeypatch):
    monkeypatch.setitem(KINDS, "toy_detr", ModelKind(ToyConfig, DETR, "sigmoid"))
    config = ToyConfig(backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1)
    assert isinstance(model_from_config(config), DETR)
    assert PostProcess.for_config(config).classification == "sigmoid"
    assert build_criterion(config).classification == "focal"
    assert config_from_dict(Path("detrkit.json"), config.to_dict()) == config


def test_backbones_are_those_the_backbone_builds():
    assert tuple(RESNET_CHANNELS) == BACKBONES
    with pytest.raises(ValueError, match="backbone must be one of resnet50, resnet101, resnet18"):
        DETRConfig(backbone="resnet152")


def test_one_check_of_unknown_fields():
    with pytest.raises(ValueError, match=r"^unknown DETRConfig fields: depth, width$"):
        DETRConfig.from_dict({"model_type": "detr", "width": 1, "depth": 2})
    with pytest.raises(ValueError, match=r"^unknown options for detr_r50: num_clases$"):
        build_config("detr_r50", num_clases=3)
    with pytest.raises(ValueError, match=r"^run\.json: unknown training options: learning_rate$"):
        TrainConfig.from_dict({"learning_rate": 1.0}, "run.json")
