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
def best_scores(model, dataset) -> list[tuple[int, float, float]]:
    """For each digit of ``dataset``: its image's index, the best score of a detection of its
    class at IoU >= 0.5 and that of a detection of another class (0 where there is none)."""
    postprocess = PostProcess.for_config(model.config)
    digits = []
    for index in range(len(dataset)):
        images, mask, targets = collate_fn([dataset[index]])
        target = targets[0]
        found = postprocess(model(images, mask), target["size"][None])[0]
        height, width = target["size"].tolist()
        boxes = target["boxes"] * torch.tensor([width, height, width, height])  # normalised cxcywh
        iou = box_iou(box_convert(boxes, "cxcywh", "xyxy"), found["boxes"])  # [G, K]
        for digit, label in enumerate(target["labels"]):
            overlaps = iou[digit] >= 0.5
            same = overlaps & (found["labels"] == label)
            other = overlaps & (found["labels"] != label)
            digits.append(
                (
                    index,
                    float(found["scores"][same].max()) if same.any() else 0.0,
                    float(found["scores"][other].max()) if other.any() else 0.0,
                )
            )
    return digits


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
    digits = best_scores(model, dataset)
    for name, count in (("picture", min(args.picture, len(dataset))), ("all", len(dataset))):
        best = [b for image, b, _ in digits if image < count]
        found = ", ".join(f"{sum(b >= t for b in best)} at {t}" for t in args.thresholds)
        low = args.thresholds[0]
        only_other = sum(o >= low > b for image, b, o in digits if image < count)
        print(
            f"{name} ({count} images, {len(best)} digits): right class {found}; only another "
            f"class at {low}: {only_other}; median best score {statistics.median(best):.2f}"
        )


if __name__ == "__main__":
    main()
