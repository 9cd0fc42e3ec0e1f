"""``detrkit eval``: COCO AP of a checkpoint on a dataset's validation split."""

from __future__ import annotations

from pathlib import Path

import torch

from detrkit.checkpoints.finite import require_finite_weights
from detrkit.checkpoints.load import load, training_run_config
from detrkit.data import (
    AugmentationConfig,
    CocoDetection,
    CocoPanoptic,
    DigitsDetection,
    make_val_transforms,
)
from detrkit.data.formats import format_dataset, is_format_data
from detrkit.engine.config import COCO_DATA, DIGITS_DATA, check_counts, is_panoptic_data
from detrkit.engine.datasets import coco_ground_truth, make_loader
from detrkit.engine.evaluate import amp_dtype, score_dataset
from detrkit.fast import optimize_for_inference
from detrkit.files import existing_results, write_json
from detrkit.models import DETRSegmentationConfig, PostProcess


def validation_set(
    data: str,
    image_scale: float = 1.0,
    digits_val: int = 200,
    seed: int = 42,
    label_mapping: str = "contiguous",
    masks: bool = False,
):
    """The validation split named by ``data``: "digits", "digits-panoptic",
    "coco:VAL_IMAGES,VAL_JSON", "coco-panoptic:VAL_IMAGES,VAL_JSON", "voc:ROOT" or
    "yolo:DATA_YAML" (their val split); with ``masks`` (a
    panoptic model) the digits' panoptic version or the COCO instances' masks."""
    transforms = make_val_transforms(AugmentationConfig().scaled(image_scale))
    if data in DIGITS_DATA:
        panoptic = masks or is_panoptic_data(data)
        return DigitsDetection("val", digits_val, seed, transforms, panoptic=panoptic)
    if is_format_data(data):  # voc:ROOT, yolo:DATA_YAML: their val split
        return format_dataset(
            data, "val", transforms, label_mapping, skip_unreadable=False, masks=masks
        )
    prefix = next((p for p in COCO_DATA if data.startswith(p)), None)
    if prefix is None:
        raise ValueError(
            f"--data {data!r}: expected 'digits', 'digits-panoptic', coco:VAL_IMAGES,VAL_JSON, "
            "coco-panoptic:VAL_IMAGES,VAL_JSON, voc:ROOT or yolo:DATA_YAML"
        )
    parts = data.removeprefix(prefix).split(",")
    if len(parts) != 2:
        raise ValueError(
            f"--data {data!r}: expected {prefix}VAL_IMAGES,VAL_JSON (the validation split "
            "only, not the four parts of training's --data)"
        )
    # Every image must be read: evaluating some would score the others' objects as missed.
    if is_panoptic_data(data):
        return CocoPanoptic(parts[0], parts[1], None, transforms, label_mapping)
    return CocoDetection(
        parts[0],
        parts[1],
        transforms,
        label_mapping=label_mapping,
        skip_unreadable=False,
        masks=masks,
    )


# What evaluate_checkpoint's data settings default to, and which fields of a training run's
# TrainConfig they come from when the weights are a checkpoint written by ``detrkit train``.
EVAL_DEFAULTS = {
    "batch_size": 2,
    "image_scale": 1.0,
    "digits_val": 200,
    "seed": 42,
    "label_mapping": "contiguous",
    "group_by_aspect": True,
}


def training_data_settings(weights: str | Path) -> dict:
    """The data settings (those of :data:`EVAL_DEFAULTS`) of the training run that wrote
    ``weights``, when a run of ``detrkit train`` did; else an empty dict.

    Deformable DETR's outputs depend on the padding of a batch and on the image scale, so
    evaluating as the run did reproduces the numbers it logged."""
    found = training_run_config(weights)
    run = found[0] if found is not None else {}
    return {name: run[name] for name in EVAL_DEFAULTS if name in run}


# What evaluate_checkpoint writes into ``out``: the 12 numbers, the COCO results.
EVAL_FILES = ("metrics.json", "results.json")


def evaluate_checkpoint(
    weights: str,
    data: str,
    out: Path | None = None,
    batch_size: int = EVAL_DEFAULTS["batch_size"],
    image_scale: float = EVAL_DEFAULTS["image_scale"],
    device: str = "cpu",
    amp: str = "none",
    workers: int = 0,
    digits_val: int = EVAL_DEFAULTS["digits_val"],
    seed: int = EVAL_DEFAULTS["seed"],
    label_mapping: str = EVAL_DEFAULTS["label_mapping"],
    precision: str | None = None,
    overwrite: bool = False,
    group_by_aspect: bool = EVAL_DEFAULTS["group_by_aspect"],
) -> dict[str, float | None]:
    """Loads ``weights``, predicts the validation split and returns the 12 COCO numbers; with
    ``out``, writes ``metrics.json`` and the COCO results file ``results.json`` there (refusing
    to replace earlier ones unless ``overwrite``). ``group_by_aspect`` batches images of
    similar aspect ratio together, as training does by default. With a
    ``precision``, runs the model prepared by :func:`~detrkit.fast.optimize_for_inference`."""
    if precision is not None and amp != "none":
        raise ValueError(f"choose one of amp ({amp!r}) and precision ({precision!r}), not both")
    if amp == "fp16" and not device.startswith("cuda"):
        raise ValueError("amp 'fp16' needs a CUDA device; use 'bf16' on the CPU")
    check_counts(batch_size=batch_size, digits_val=digits_val)
    if not image_scale > 0:
        raise ValueError(f"image_scale must be positive, got {image_scale}")
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there; the results go into a directory")
    if out is not None:
        existing_results([out / name for name in EVAL_FILES], f"--out {out}", overwrite)
    model = load(weights, map_location=device)
    require_finite_weights(model, str(weights))
    masks = isinstance(model.config, DETRSegmentationConfig)
    dataset = validation_set(data, image_scale, digits_val, seed, label_mapping, masks)
    check_classes(model.config, dataset, str(weights), data)
    if precision is not None:
        model = optimize_for_inference(model, precision)
    loader = make_loader(
        dataset, batch_size, seed, shuffle=False, workers=workers, group_by_aspect=group_by_aspect
    )
    loader.batch_sampler.set_epoch(0)
    category_ids = None if label_mapping == "coco" else dataset.category_ids
    numbers, results = score_dataset(
        model,
        loader,
        dataset,
        coco_ground_truth(dataset),
        PostProcess.for_config(model.config),
        category_ids,
        torch.device(device),
        amp_dtype(amp, torch.device(device)),
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / EVAL_FILES[0], numbers, indent=2)
        write_json(out / EVAL_FILES[1], results)
    return numbers


def check_classes(config, dataset, weights: str, data: str) -> None:
    """Raises ValueError when the model's classes are not the dataset's: a model of C classes
    scored on a dataset of other classes gives numbers that mean nothing."""
    if config.num_classes != dataset.num_classes:
        raise ValueError(
            f"{weights} predicts {config.num_classes} classes but --data {data} has "
            f"{dataset.num_classes}; evaluate it on the dataset it was trained for, or fine-tune "
            "it first"
        )
    if config.category_ids is not None and list(config.category_ids) != list(dataset.category_ids):
        raise ValueError(
            f"{weights} was trained on category ids {config.category_ids} but --data {data} has "
            f"{list(dataset.category_ids)}"
        )
