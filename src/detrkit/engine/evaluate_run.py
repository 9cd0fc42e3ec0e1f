"""``detrkit eval``: COCO AP of a checkpoint on a dataset's validation split."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import detrkit
from detrkit.data import AugmentationConfig, CocoDetection, DigitsDetection, make_val_transforms
from detrkit.engine.datasets import coco_ground_truth, make_loader
from detrkit.engine.evaluate import AUTOCAST_DTYPES, coco_metrics, predict_dataset
from detrkit.models import PostProcess, optimize_for_inference


def validation_set(
    data: str,
    image_scale: float = 1.0,
    digits_val: int = 200,
    seed: int = 42,
    label_mapping: str = "contiguous",
):
    """The validation split named by ``data``: "digits", "coco:VAL_IMAGES,VAL_JSON" or the
    four-part training form (its last two parts)."""
    transforms = make_val_transforms(AugmentationConfig().scaled(image_scale))
    if data == "digits":
        return DigitsDetection("val", digits_val, seed, transforms)
    if data.startswith("coco:"):
        parts = data.removeprefix("coco:").split(",")
        if len(parts) not in (2, 4):
            raise ValueError(f"--data {data!r}: expected coco:VAL_IMAGES,VAL_JSON")
        return CocoDetection(parts[-2], parts[-1], transforms, label_mapping=label_mapping)
    raise ValueError(f"--data {data!r}: expected 'digits' or 'coco:...'")


def evaluate_checkpoint(
    weights: str,
    data: str,
    out: Path | None = None,
    batch_size: int = 2,
    image_scale: float = 1.0,
    device: str = "cpu",
    amp: str = "none",
    workers: int = 0,
    digits_val: int = 200,
    seed: int = 42,
    label_mapping: str = "contiguous",
    precision: str | None = None,
) -> dict[str, float | None]:
    """Loads ``weights``, predicts the validation split and returns the 12 COCO numbers; with
    ``out``, writes ``metrics.json`` and the COCO results file ``results.json`` there. With a
    ``precision``, runs the model prepared by :func:`~detrkit.models.optimize_for_inference`."""
    if precision is not None and amp != "none":
        raise ValueError(f"choose one of amp ({amp!r}) and precision ({precision!r}), not both")
    model = detrkit.load(weights, map_location=device)
    if precision is not None:
        model = optimize_for_inference(model, precision)
    dataset = validation_set(data, image_scale, digits_val, seed, label_mapping)
    loader = make_loader(dataset, batch_size, seed, shuffle=False, workers=workers)
    loader.batch_sampler.set_epoch(0)
    category_ids = None if label_mapping == "coco" else dataset.category_ids
    results = predict_dataset(
        model,
        loader,
        PostProcess.for_config(model.config),
        category_ids,
        torch.device(device),
        AUTOCAST_DTYPES[amp],
    )
    numbers = coco_metrics(coco_ground_truth(dataset), results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(numbers, indent=2) + "\n")
        (out / "results.json").write_text(json.dumps(results))
    return numbers
