"""How many digits of the demo's validation images get a box of their class, and how confident.

    python benchmarks/demo_recall.py runs/demo/checkpoint.pth [--thresholds 0.3 0.5] [--picture 8]

Each image runs on its own, as ``predictions.png`` and ``detrkit predict`` run it, with the data
settings of the training run that wrote the checkpoint (image scale, number and seed of the
validation images). A ground-truth digit counts as found at a threshold when a detection of its
class overlaps it at IoU >= 0.5 and scores at least that much. Prints the counts for the images
``predictions.png`` draws (the first ``--picture``) and for all validation images, and the
median over digits of the best such score.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torchvision.ops import box_convert, box_iou

from detrkit.checkpoints import load
from detrkit.data import collate_fn
from detrkit.engine.evaluate_run import EVAL_DEFAULTS, training_data_settings, validation_set
from detrkit.models import PostProcess


@torch.no_grad()
def best_scores(model, dataset, count: int) -> tuple[list[float], list[bool]]:
    """For each digit of the first ``count`` images: the best score of a same-class detection
    at IoU >= 0.5 (0 if none), and whether a detection of another class overlaps it so."""
    postprocess = PostProcess.for_config(model.config)
    best, confused = [], []
    for index in range(count):
        images, mask, targets = collate_fn([dataset[index]])
        target = targets[0]
        found = postprocess(model(images, mask), target["size"][None])[0]
        height, width = target["size"].tolist()
        boxes = target["boxes"] * torch.tensor([width, height, width, height])  # normalised cxcywh
        iou = box_iou(box_convert(boxes, "cxcywh", "xyxy"), found["boxes"])  # [G, K]
        for digit, label in enumerate(target["labels"]):
            overlaps = iou[digit] >= 0.5
            same = overlaps & (found["labels"] == label)
            best.append(float(found["scores"][same].max()) if same.any() else 0.0)
            other = overlaps & (found["labels"] != label)
            confused.append(float(found["scores"][other].max()) if other.any() else 0.0)
    return best, confused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--picture", type=int, default=8)
    args = parser.parse_args()
    settings = {**EVAL_DEFAULTS, **training_data_settings(args.weights)}
    dataset = validation_set(
        "digits",
        image_scale=settings["image_scale"],
        digits_val=settings["digits_val"],
        seed=settings["seed"],
    )
    model = load(args.weights, map_location="cpu").eval()
    for name, count in (("picture", min(args.picture, len(dataset))), ("all", len(dataset))):
        best, confused = best_scores(model, dataset, count)
        found = ", ".join(f"{sum(s >= t for s in best)} at {t}" for t in args.thresholds)
        only_other = sum(c >= args.thresholds[0] > b for b, c in zip(best, confused))
        print(
            f"{name} ({count} images, {len(best)} digits): right class {found}; only another "
            f"class at {args.thresholds[0]}: {only_other}; median best score "
            f"{statistics.median(best):.2f}"
        )


if __name__ == "__main__":
    main()
