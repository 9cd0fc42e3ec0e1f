"""Typed model configurations. Field names follow the original code's command-line arguments, so an
official checkpoint's ``args`` map onto them directly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DETRConfig:
    """Everything that determines a DETR model's architecture (and so its checkpoint layout)."""

    backbone: Literal["resnet50", "resnet101"] = "resnet50"
    dilation: bool = False  # DC5: dilate the last ResNet stage instead of striding
    position_embedding: Literal["sine", "learned"] = "sine"
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_queries: int = 100
    num_classes: int = 91  # the largest class id + 1; one more logit is "no object"
    aux_loss: bool = True
    class_names: list[str] | None = field(default=None)  # index -> name, when known

    model_type: str = field(default="detr", init=False)

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet50", "resnet101"):
            raise ValueError(f"backbone must be 'resnet50' or 'resnet101', got {self.backbone!r}")
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
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes is "
                f"{self.num_classes}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DETRConfig:
        """Builds a config from a dict, rejecting unknown fields by name."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known - {"model_type"})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})
