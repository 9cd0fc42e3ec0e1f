"""The training configuration: one typed dataclass, resolved from the model's original recipe,
written to the run directory and readable back with ``--config``."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detrkit.data.formats import format_path, is_format_data
from detrkit.files import write_json
from detrkit.models import ModelConfig
from detrkit.models.config import check_known_fields

# The original recipes (DETR: Carion et al.; Deformable DETR: Zhu et al.). None in TrainConfig
# means "the recipe's value".
RECIPES: dict[str, dict[str, Any]] = {
    "detr": dict(
        lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=1.0, epochs=300, lr_drop=200, batch_size=2
    ),
    "deformable_detr": dict(
        lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, epochs=50, lr_drop=40, batch_size=2
    ),
    # The original's panoptic recipe: the mask head trains 25 epochs, the lr dropped at 15.
    "detr_segmentation": dict(
        lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=1.0, epochs=25, lr_drop=15, batch_size=2
    ),
}


DEFAULT_MODEL = "deformable_detr_digits"

# Mixed precision: "auto" is bf16 where the device computes it in hardware (engine.evaluate.amp_dtype).
AMP_CHOICES = ("none", "bf16", "fp16", "auto")

# The built-in digits: boxes (with masks for a panoptic model), or always the panoptic version
# (the canvas as an 11th, stuff class), e.g. to train the detector a panoptic model will use.
DIGITS_DATA = ("digits", "digits-panoptic")
# COCO files: instances JSONs (with masks for a panoptic model: polygons or RLE), or COCO's
# panoptic format (each JSON with its folder of PNGs beside it, named as the JSON without .json).
COCO_DATA = ("coco:", "coco-panoptic:")


def is_panoptic_data(data: str) -> bool:
    """Whether ``data`` names one of the panoptic forms (things and stuff, masks always)."""
    return data == "digits-panoptic" or data.startswith("coco-panoptic:")


def check_counts(**counts: int | None) -> None:
    """Raises ValueError naming the first of ``counts`` below 1 (None: not set)."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    """A TrainConfig field with the help text ``detrkit train --help`` shows for its option."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``model_options`` override the model preset."""

    model: str | None = _option(
        None,
        "a model preset (`detrkit models` lists them); default: the --finetune checkpoint's "
        f"model, or {DEFAULT_MODEL} for the built-in digits",
    )
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str = _option(
        "digits",
        "'digits' (the built-in dataset, made on the fly; 'digits-panoptic': its panoptic "
        "version), coco:TRAIN_IMAGES,TRAIN_JSON,VAL_IMAGES,VAL_JSON (COCO instances files) or "
        "coco-panoptic:TRAIN_IMAGES,TRAIN_JSON,VAL_IMAGES,VAL_JSON (COCO panoptic files, "
        "their PNG folders beside them), voc:ROOT (a Pascal VOC folder) or yolo:DATA_YAML (a "
        "YOLO dataset)",
    )
    label_mapping: str = _option(
        "contiguous",
        "COCO data: 'contiguous' numbers the categories 0..C-1 (ids kept in the model to "
        "write results with), 'coco' uses the category ids as labels (the 91-class models)",
    )
    output: str | None = _option(
        None,
        "the run directory (default: a new folder under runs/); one holding an earlier run is "
        "refused unless --overwrite",
    )
    finetune: str | None = _option(
        None,
        "start from these weights (anything detrkit.load reads); a new class count starts a new "
        "class head; a detrkit run's checkpoint also gives its image_scale, augment and "
        "batch_size unless given",
    )
    freeze_backbone: bool = _option(
        False, "do not train the backbone (after its pre-training, if any)"
    )
    # The paper's panoptic recipe: a trained detector (--finetune), frozen, and the mask head
    # trained alone.
    freeze_detector: bool = _option(
        False, "panoptic models: train the mask head alone, the detector (detr.*) frozen"
    )

    epochs: int | None = _option(None, "epochs (default: the model's original recipe)")
    batch_size: int | None = _option(None, "images per batch and process (default: recipe)")
    lr: float | None = _option(None, "learning rate (default: recipe)")
    lr_backbone: float | None = _option(None, "the backbone's learning rate (default: recipe)")
    lr_linear_proj_mult: float | None = _option(
        None, "learning-rate factor of the sampling offsets and reference points (default: recipe)"
    )
    lr_drop: int | None = _option(
        None, "epoch at which the learning rate drops tenfold (default: recipe)"
    )
    weight_decay: float = _option(1e-4, "AdamW weight decay")
    clip_max_norm: float = _option(0.1, "gradient norm clip (0: none)")
    grad_accum: int = _option(1, "batches per optimiser step")
    amp: str = _option(
        "none",
        "'none', 'bf16' (CPU and GPU), 'fp16' (GPU, with a gradient scaler) or 'auto' (bf16 "
        "where the device computes it in hardware: AVX-512 BF16 or AMX CPUs, bf16 GPUs; else "
        "none)",
    )
    ema_decay: float = _option(
        0.0, "decay of an exponential moving average of the weights (0: none)"
    )
    # Compiling takes minutes on a CPU (3 for a tiny DETR on 2 cores), so it pays only on long
    # runs.
    compile: bool = _option(False, "torch.compile the model for training (dynamic shapes)")
    # oneDNN's CPU convolutions and their gradients run faster channels-last (docs/performance.md:
    # a DETR step about 12% faster in fp32, Deformable DETR's 2-9%, the backbone 2.5x in bf16).
    # Checkpoints are the same: state dicts load into either layout. Unmeasured on GPUs.
    channels_last: bool = _option(True, "convolution weights and activations channels-last")
    # DN-DETR (Li et al., 2022): 5 groups, label noise 0.2, box noise 0.4 in the paper.
    # detrkit.loss.denoising; the model and its checkpoint are as without.
    denoising: int = _option(
        0,
        "denoising training (DN-DETR): this many groups of noised ground-truth objects as "
        "extra decoder queries, each trained to give back its object; training only "
        "(0: off; the paper's: 5)",
    )
    dn_label_noise: float = _option(
        0.2, "denoising: the probability that a noised object's label becomes a random class"
    )
    dn_box_noise: float = _option(
        0.4,
        "denoising: box centres move by up to this times half the box's size, sizes scale by "
        "a factor within 1 +- this",
    )

    image_scale: float = _option(
        1.0, "multiplies every image size of the original recipe (0.2: 160-266 pixel images)"
    )
    augment: bool = _option(
        True, "random flips, crops and rescaling; --no-augment trains on the validation resize"
    )
    digits_train: int = _option(2000, "training images of the built-in digits")
    digits_val: int = _option(200, "validation images of the built-in digits")
    # The stand-in for ImageNet pre-training; afterwards the backbone's batch norm is frozen (see
    # detrkit.engine.pretrain).
    backbone_pretrain_steps: int = _option(
        0, "digits only: first train the backbone this many steps to classify digit crops"
    )
    backbone_pretrain_images: int | None = _option(
        None, "the training scenes whose crops pre-training uses (default: digits_train)"
    )
    # Deformable DETR's outputs depend on the padding an image gets in its batch; batches of
    # one aspect ratio have almost none, in training and in evaluation (docs/training.md).
    group_by_aspect: bool = _option(
        True, "batch images of similar aspect ratio together (less padding), also in evaluation"
    )
    workers: int = _option(2, "data-loading processes")
    seed: int = _option(42, "seed of every random stream of the run")
    device: str = _option("cpu", "cpu, cuda, cuda:1...")
    deterministic: bool = _option(False, "torch's deterministic algorithms")
    eval_every: int = _option(1, "evaluate every this many epochs (and after the last)")
    checkpoint_every: int = _option(1, "write the checkpoint every this many epochs")
    log_every: int = _option(10, "log the losses every this many steps")
    max_steps_per_epoch: int | None = _option(None, "cut epochs short (smoke tests, quick looks)")

    def __post_init__(self) -> None:
        self._check_types()

    def _check_types(self) -> None:
        """Raises ValueError naming the first field whose value is not of its annotated kind (a
        config file's "5" for epochs, or a list for a number)."""
        kinds = {
            "int": ("an integer", lambda v: isinstance(v, numbers.Integral)),
            "float": ("a number", lambda v: isinstance(v, numbers.Real)),
            "str": ("a string", lambda v: isinstance(v, str)),
            "bool": ("true or false", lambda v: isinstance(v, bool)),
            "dict[str, Any]": ("an object", lambda v: isinstance(v, dict)),
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts = [part.strip() for part in str(f.type).split("|")]
            if value is None and "None" in parts:
                continue
            kind, accepts = kinds[parts[0]]
            if (isinstance(value, bool) and parts[0] != "bool") or not accepts(value):
                raise ValueError(
                    f"{f.name} must be {kind}{' or null' if 'None' in parts else ''}, got {value!r}"
                )

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
        for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if self.label_mapping not in ("contiguous", "coco"):
            raise ValueError(
                f"label_mapping must be 'contiguous' or 'coco', got {self.label_mapping!r}"
            )
        if is_format_data(self.data):
            format_path(self.data)
        elif self.data not in DIGITS_DATA:
            self.coco_paths()
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        if self.denoising < 0:
            raise ValueError(f"denoising must be a non-negative group count, got {self.denoising}")
        if not 0 <= self.dn_label_noise <= 1:
            raise ValueError(f"dn_label_noise must be in [0, 1], got {self.dn_label_noise}")
        if not 0 <= self.dn_box_noise < 1:
            raise ValueError(f"dn_box_noise must be in [0, 1), got {self.dn_box_noise}")
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
        if self.backbone_pretrain_steps and self.data not in DIGITS_DATA:
            raise ValueError(
                "backbone_pretrain_steps works on the built-in digits only (it classifies their "
                f"crops), not on --data {self.data!r}"
            )

    def coco_paths(self) -> tuple[str, str, str, str]:
        """The train images, train JSON, validation images and validation JSON that
        ``data = "coco:..."`` (or ``"coco-panoptic:..."``) names; ValueError for any other form
        of ``data``."""
        prefix = next((p for p in COCO_DATA if self.data.startswith(p)), "")
        parts = self.data.removeprefix(prefix).split(",")
        if not prefix or len(parts) != 4:
            raise ValueError(
                "data must be 'digits', 'digits-panoptic', "
                "coco:TRAIN_IMAGES,TRAIN_JSON,VAL_IMAGES,VAL_JSON, "
                "coco-panoptic:TRAIN_IMAGES,TRAIN_JSON,VAL_IMAGES,VAL_JSON, voc:ROOT or "
                f"yolo:DATA_YAML, got {self.data!r}"
            )
        return parts[0], parts[1], parts[2], parts[3]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Writes the config as JSON (atomically), as a run's config.json."""
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Reads a config written by :meth:`save` (unknown fields are an error naming the file)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else error
            raise ValueError(f"{path}: not a readable JSON config: {reason}") from None
        return cls.from_dict(values, str(path))

    @classmethod
    def from_dict(cls, values: Any, source: str) -> TrainConfig:
        """The config ``values`` describe; an error names ``source`` and the bad field."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: not a training config (expected a JSON object)")
        check_known_fields(cls, values, f"{source}: unknown training options")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
