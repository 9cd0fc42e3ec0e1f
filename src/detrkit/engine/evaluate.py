"""COCO box evaluation with pycocotools: the 12 standard numbers, as fractions in [0, 1]."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from detrkit.checkpoints.finite import require_finite_outputs
from detrkit.data.coco import to_coco_results

# --amp choices -> the dtype torch.autocast runs the model in (None: full precision)
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

COCO_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def coco_metrics(coco_gt, results: list[dict]) -> dict[str, float | None]:
    """COCOeval's 12 bbox numbers for ``results`` against the ground truth ``coco_gt`` (a
    pycocotools COCO). Numbers pycocotools cannot compute (no objects of a size) are None."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes refuses an empty list; no detections score 0 where there are objects
            coco_dt = COCO()
            coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: (None if value < 0 else float(value))
        for name, value in zip(COCO_METRICS, evaluator.stats)
    }


def gather_results(results: list[dict]) -> list[dict]:
    """All processes' results on every process (identity without torch.distributed), each image
    once (:func:`merge_rank_results`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return results
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, results)
    return merge_rank_results(gathered)


def merge_rank_results(parts: Sequence[list[dict]]) -> list[dict]:
    """The processes' COCO results as one list, an image's entries taken from the first process
    that has any. ``DistributedSampler`` pads the processes' shares to equal length by repeating
    images; counted twice, a repeated image's detections would be false positives."""
    merged: list[dict] = []
    earlier: set[int] = set()
    for part in parts:
        merged.extend(entry for entry in part if entry["image_id"] not in earlier)
        earlier.update(entry["image_id"] for entry in part)
    return merged


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    batches: Iterable,
    postprocess: nn.Module,
    category_ids: Sequence[int] | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict]:
    """COCO results of ``model`` on every batch ``(images, mask, targets)``; targets need
    ``image_id`` and ``orig_size`` (h, w)."""
    model.eval()
    results = []
    for images, mask, targets in batches:
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(images, mask)
        # pycocotools would count NaN boxes as matches: a diverged model must not score.
        require_finite_outputs(outputs, f"images {[int(t['image_id']) for t in targets]}")
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        for target, detections in zip(targets, postprocess(outputs, orig_sizes)):
            results.extend(to_coco_results(int(target["image_id"]), detections, category_ids))
    return results
