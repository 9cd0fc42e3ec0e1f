"""Whether a lower precision gives the same detections as fp32: COCO AP and matched boxes.

    python benchmarks/precision.py --weights runs/demo/checkpoint.pth [--data digits]
        [--image-scale 0.2] [--digits-val 100] [--precision bf16] [--threshold 0.5 ...]
        [--batch-size 4] [--device cpu]

The checkpoint is prepared by ``optimize_for_inference`` in fp32 and in ``--precision``, and both
predict the same validation split (the one ``detrkit eval`` reads). Printed: the 12 COCO numbers
of each and their difference, and how many of fp32's detections scoring at least each ``--threshold``
have a detection of the same class in the same image in the lower precision overlapping them at
IoU >= 0.95 (and at 0.99). Issue 8's bar for bf16: AP within 0.005 of fp32's, and at least 99%
of the detections above the threshold matched at IoU >= 0.95.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torchvision.ops import box_iou

import detrkit
from detrkit.engine.datasets import coco_ground_truth, make_loader
from detrkit.engine.evaluate import coco_metrics, predict_dataset
from detrkit.engine.evaluate_run import validation_set
from detrkit.fast import optimize_for_inference
from detrkit.models import PostProcess

IOU_BARS = (0.95, 0.99)


def predictions(model, dataset, args) -> list[dict]:
    """COCO results of ``model`` on ``dataset``, in the loader order ``detrkit eval`` uses."""
    loader = make_loader(dataset, args.batch_size, args.seed, shuffle=False, workers=0)
    loader.batch_sampler.set_epoch(0)
    postprocess = PostProcess.for_config(model.config)
    device = torch.device(args.device)
    return predict_dataset(model, loader, postprocess, dataset.category_ids, device)


def boxes_by_image_and_class(results: list[dict], threshold: float = 0.0) -> dict:
    """(image id, class) -> ``[K, 4]`` xyxy boxes of the results scoring at least ``threshold``."""
    grouped = defaultdict(list)
    for entry in results:
        if entry["score"] >= threshold:
            x, y, w, h = entry["bbox"]
            grouped[entry["image_id"], entry["category_id"]].append([x, y, x + w, y + h])
    return {key: torch.tensor(boxes) for key, boxes in grouped.items()}


def matched_fractions(reference: list[dict], other: list[dict], threshold: float):
    """For each IoU bar: how many of ``reference``'s detections above ``threshold`` have a
    detection of ``other`` (any score) of the same image and class at that IoU or more, and of
    how many."""
    wanted = boxes_by_image_and_class(reference, threshold)
    found = boxes_by_image_and_class(other)
    best = []
    for key, boxes in wanted.items():
        if key in found:
            best.append(box_iou(boxes, found[key]).max(dim=1).values)
        else:
            best.append(torch.zeros(len(boxes)))
    best_iou = torch.cat(best) if best else torch.zeros(0)
    return {bar: (int((best_iou >= bar).sum()), len(best_iou)) for bar in IOU_BARS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="anything detrkit.load reads")
    parser.add_argument("--data", default="digits", help="digits or coco:VAL_IMAGES,VAL_JSON")
    parser.add_argument("--image-scale", type=float, default=1.0)
    parser.add_argument("--digits-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.5])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    loaded = detrkit.load(args.weights, map_location=args.device)
    dataset = validation_set(args.data, args.image_scale, args.digits_val, args.seed)
    ground_truth = coco_ground_truth(dataset)
    results, metrics = {}, {}
    for precision in ("fp32", args.precision):
        model = optimize_for_inference(loaded, precision)
        results[precision] = predictions(model, dataset, args)
        metrics[precision] = coco_metrics(ground_truth, results[precision])

    low = args.precision
    print(f"{args.weights} on {args.data} ({len(dataset)} images), {args.device}")
    print(f"  {'':6s} {'fp32':>8s} {low:>8s} {'diff':>8s}")
    for name, value in metrics["fp32"].items():
        other = metrics[low][name]
        if value is None or other is None:
            continue
        print(f"  {name:6s} {value:8.4f} {other:8.4f} {other - value:+8.4f}")
    for threshold in args.threshold:
        for bar, (matched, total) in matched_fractions(
            results["fp32"], results[low], threshold
        ).items():
            share = matched / total if total else float("nan")
            print(
                f"  fp32 detections scoring >= {threshold}: {matched} of {total} ({share:.2%}) "
                f"have a {low} box of their class at IoU >= {bar}"
            )


if __name__ == "__main__":
    main()
