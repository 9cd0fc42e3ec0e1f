"""Typed model configurations. Field names follow the original code's command-line arguments, so an
official checkpoint's ``args`` map onto them directly."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from detrkit.models.backbone import RESNET_CHANNELS

# The backbones a config may name: those that models/backbone.py builds.
BACKBONES: tuple[str, ...] = tuple(RESNET_CHANNELS)


def check_known_fields(
    cls: type, names: Iterable[str], what: str, also: Iterable[str] = ()
) -> None:
    """Raises ValueError ``"{what}: a, b"`` naming every entry of ``names`` that is neither a
    field of the dataclass ``cls`` nor in ``also``: a misspelt option must fail, not be ignored."""
    known = {f.name for f in dataclasses.fields(cls)} | set(also)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{what}: {', '.join(unknown)}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The list fields of configs: what they hold (for errors), which items they accept and how
# each item is stored.
_LIST_FIELDS: dict[str, tuple[str, Any, Any]] = {
    "class_names": ("a list of names or null", lambda item: isinstance(item, str), str),
    "category_ids": ("a list of integers or null", _is_integer, int),
    "is_thing": ("a list of true/false or null", lambda item: isinstance(item, bool), bool),
}

# COCO panoptic's category ids (what the published 250-class panoptic models predict): 1 to 90
# are its things, 92 to 200 its stuff (the original's ``is_thing_map = {i: i <= 90}``).
COCO_PANOPTIC_LAST_THING_ID = 90
COCO_PANOPTIC_NUM_CLASSES = 250


@dataclass
class ModelConfig:
    """What every detector's architecture shares; subclasses add their own fields."""

    backbone: str = "resnet50"  # one of BACKBONES
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding
    # "frozen": the original's frozen batch norm (for pre-trained weights); "batch": trainable
    # batch norm and every stage trained, for training from scratch.
    backbone_norm: Literal["frozen", "batch"] = "frozen"
    position_embedding: Literal["sine", "learned"] = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91  # the largest class id + 1
    aux_loss: bool = True
    class_names: list[str] | None = None  # index -> name, when known
    # index -> the dataset's category id, when the dataset numbers its categories otherwise
    # (COCO files may use any ids: {1, 5, 9}); None: the index is the id.
    category_ids: list[int] | None = None

    model_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._check_types()
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(
                f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}"
            )
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(
                f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}"
            )
        if self.hidden_dim % self.nheads:
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})"
            )
        for name in ("enc_layers", "dec_layers", "num_queries", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("class_names", "category_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_classes:
                raise ValueError(
                    f"{name} has {len(value)} entries but num_classes is {self.num_classes}"
                )

    def _check_types(self) -> None:
        """Raises ValueError naming the first field whose value is not of its kind: a string
        "False" from a command line must not switch a feature on by being non-empty."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if isinstance(default, bool):
                kind, ok = "true or false", isinstance(value, bool)
            elif isinstance(default, (int, float)):  # numpy's numbers count too
                whole = isinstance(default, int)
                kind = "an integer" if whole else "a number"
                ok = isinstance(value, numbers.Integral if whole else numbers.Real)
                ok = ok and not isinstance(value, bool)
            elif isinstance(default, str):
                kind, ok = "a string", isinstance(value, str)
            else:  # class_names, category_ids, is_thing: lists or None
                kind, item_ok, convert = _LIST_FIELDS.get(f.name, _LIST_FIELDS["class_names"])
                ok = value is None or (
                    isinstance(value, (list, tuple)) and all(item_ok(item) for item in value)
                )
                if ok and value is not None:
                    setattr(self, f.name, [convert(v) for v in value])
            if not ok:
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Builds a config from a dict, rejecting unknown fields by name."""
        check_known_fields(cls, values, f"unknown {cls.__name__} fields", also=["model_type"])
        return cls(**{k: v for k, v in values.items() if k != "model_type"})


@dataclass
class DETRConfig(ModelConfig):
    """DETR (Carion et al., 2020): one feature level, dense attention, softmax classes with a
    "no object" logit."""

    pre_norm: bool = False

    model_type: ClassVar[str] = "detr"


@dataclass
class DETRSegmentationConfig(DETRConfig):
    """DETR with the mask head of its panoptic models: the detector's fields, one mask per
    query (:class:`~detrkit.models.segmentation.DETRSegmentation`)."""

    # Per class, whether it is a thing (counted objects) or stuff (amorphous regions, one
    # segment per class in a panoptic segmentation); None: COCO panoptic's own split for
    # 250-class models (the published ones), every class a thing for others. See thing_classes.
    is_thing: list[bool] | None = None

    model_type: ClassVar[str] = "detr_segmentation"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_thing is not None and len(self.is_thing) != self.num_classes:
            raise ValueError(
                f"is_thing has {len(self.is_thing)} entries but num_classes is {self.num_classes}"
            )
        # The mask head's group norms (8 groups) take hidden_dim + nheads channels, then
        # hidden_dim / 2 down to hidden_dim / 16.
        if (self.hidden_dim + self.nheads) % 8 or self.hidden_dim % 128:
            raise ValueError(
                "the mask head needs hidden_dim a multiple of 128 and hidden_dim + nheads a "
                f"multiple of 8, got hidden_dim {self.hidden_dim} and nheads {self.nheads}"
            )

    def thing_classes(self) -> list[bool]:
        """Whether each class is a thing: ``is_thing`` when set; else, for a 250-class model (the
        published panoptic ones predict COCO panoptic's category ids), the ids up to 90; else
        every class."""
        if self.is_thing is not None:
            return list(self.is_thing)
        if self.num_classes == COCO_PANOPTIC_NUM_CLASSES:
            return [i <= COCO_PANOPTIC_LAST_THING_ID for i in range(self.num_classes)]
        return [True] * self.num_classes


@dataclass
class DeformableDETRConfig(ModelConfig):
    """Deformable DETR (Zhu et al., 2021): multi-scale deformable attention, sigmoid classes."""

    dim_feedforward: int = 1024
    num_queries: int = 300
    num_feature_levels: int = 4  # C3-C5 and a stride-2 conv on C5; 1 = C5 only
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False  # each decoder layer refines the previous layer's boxes
    two_stage: bool = False  # queries start from the encoder's best proposals

    model_type: ClassVar[str] = "deformable_detr"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_feature_levels < 1:
            raise ValueError(
                f"num_feature_levels must be at least 1, got {self.num_feature_levels}"
            )
        if self.two_stage and not self.with_box_refine:
            raise ValueError("two_stage needs with_box_refine=True, as in the published model")
