"""The training configuration: one typed dataclass, resolved from the model's original recipe,
written to the run directory and readable back with ``--config``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detrkit.files import write_json
from detrkit.models import ModelConfig

# The original recipes (DETR: Carion et al.; Deformable DETR: Zhu et al.). None in TrainConfig
# means "the recipe's value".
RECIPES: dict[str, dict[str, Any]] = {
    "detr": dict(
        lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=1.0, epochs=300, lr_drop=200, batch_size=2
    ),
    "deformable_detr": dict(
        lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, epochs=50, lr_drop=40, batch_size=2
    ),
}


DEFAULT_MODEL = "deformable_detr_digits"


def check_counts(**counts: int | None) -> None:
    """Raises ValueError naming the first of ``counts`` below 1 (None: not set)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``model_options`` override the model preset."""

    # A preset name. None: the --finetune checkpoint's model, or else DEFAULT_MODEL.
    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = "digits"  # "digits" or "coco:TRAIN_IMAGES,TRAIN_JSON,VAL_IMAGES,VAL_JSON"
    label_mapping: str = "contiguous"  # COCO data: "coco" keeps category ids (91-class models)
    output: str | None = None  # default: a new folder under runs/
    finetune: str | None = None  # weights detrkit.load reads; a new class count resets the head
    freeze_backbone: bool = False

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_backbone: float | None = None
    lr_linear_proj_mult: float | None = None  # sampling offsets and reference points
    lr_drop: int | None = None  # epoch at which the learning rate drops tenfold
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    grad_accum: int = 1  # batches per optimiser step
    amp: str = "none"  # "none", "bf16" (CPU and GPU) or "fp16" (GPU, with a grad scaler)
    ema_decay: float = 0.0  # 0: no exponential moving average of the weights
    # torch.compile the model for training (forward and backward, dynamic shapes). Compiling
    # takes minutes on a CPU (3 for a tiny DETR on 2 cores), so it pays only on long runs.
    compile: bool = False
    # Convolution weights (and so the backbone's activations and gradients) in channels-last
    # memory, where oneDNN's CPU convolutions and their gradients run faster (docs/benchmarks.md:
    # a DETR step about 12% faster in fp32, Deformable DETR's 2-9%, the backbone 2.5x in bf16).
    # Checkpoints are the same: state dicts load into either layout. Unmeasured on GPUs.
    channels_last: bool = True

    image_scale: float = 1.0  # multiplies every augmentation size of the original recipe
    augment: bool = True  # False: train on the validation resize (no flip, crop or rescale)
    digits_train: int = 2000  # images of the built-in dataset
    digits_val: int = 200
    # Digits only: first train the backbone for this many steps to classify the digit crops of
    # the first backbone_pretrain_images training scenes (None: digits_train), the stand-in for
    # ImageNet pre-training; afterwards its batch norm is frozen (see detrkit.engine.pretrain).
    backbone_pretrain_steps: int = 0
    backbone_pretrain_images: int | None = None
    workers: int = 2
    seed: int = 42
    device: str = "cpu"
    deterministic: bool = False
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1  # epochs
    log_every: int = 10  # steps
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests, quick looks)

    def resolved(self, model_config: ModelConfig) -> TrainConfig:
        """This config with every None filled from the model's original recipe."""
        recipe = RECIPES[model_config.model_type]
        values = {name: recipe[name] for name in recipe if getattr(self, name) is None}
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        """Raises ValueError naming the first field out of its range (unresolved None fields
        are left to :meth:`resolved`)."""
        counts = ("grad_accum", "eval_every", "checkpoint_every", "log_every", "epochs")
        counts += ("batch_size", "digits_train", "digits_val", "max_steps_per_epoch", "lr_drop")
        check_counts(**{name: getattr(self, name) for name in counts})
        if not self.image_scale > 0:
            raise ValueError(f"image_scale must be positive, got {self.image_scale}")
        if self.workers < 0:
            raise ValueError(f"workers must be non-negative, got {self.workers}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.backbone_pretrain_steps < 0:
            raise ValueError(
                f"backbone_pretrain_steps must be non-negative, got {self.backbone_pretrain_steps}"
            )
        if self.backbone_pretrain_images is not None and self.backbone_pretrain_images < 1:
            raise ValueError(
                "backbone_pretrain_images must be at least 1 (or None for digits_train), got "
                f"{self.backbone_pretrain_images}"
            )
        if self.backbone_pretrain_steps and self.data != "digits":
            raise ValueError(
                "backbone_pretrain_steps works on the built-in digits only (it classifies their "
                f"crops), not on --data {self.data!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Reads a config written by :meth:`save` (unknown fields are an error naming the file)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable JSON config: {error}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown training options: {', '.join(unknown)}")
        return cls(**values)
