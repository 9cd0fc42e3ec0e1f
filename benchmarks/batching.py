"""Throughput of a batch run whole or in chunks of images on a CPU: what sets
``detrkit.fast.chunking.CPU_PIXELS_PER_FORWARD``.

    python benchmarks/batching.py [--models detr_r50 deformable_detr] [--batch 8] [--repeats 2]
                                  [--sizes 800x1066 400x533 300x400 200x266] [--precision bf16]

For every model and image size: images/s of the model prepared by ``optimize_for_inference``
(random weights) on a batch of ``--batch`` images run whole, in chunks of 1, 2 and 4 images, and
as ``optimize_for_inference`` sets it (chunks of ``cpu_pixels_per_forward`` pixels for the
precision), each as a multiple of the whole batch's rate.
"""

from __future__ import annotations

import argparse
import time

import torch

from detrkit.fast import chunking, optimize_for_inference
from detrkit.fast.chunking import ChunkedBatches
from detrkit.models import build_model


def images_per_second(model, images: torch.Tensor, mask: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timed calls after a warm-up."""
    model(images, mask)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(images, mask)
        best = min(best, time.perf_counter() - start)
    return images.shape[0] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr_r50", "deformable_detr"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["800x1066", "400x533", "300x400", "200x266"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    budget = chunking.CPU_PIXELS_PER_FORWARD
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.precision}"
    )
    print(f"{'model':16s} {'size':>9s} {'whole img/s':>11s}  chunks of 1 / 2 / 4 / default")
    for name in args.models:
        torch.manual_seed(0)
        model = optimize_for_inference(build_model(name), args.precision)
        assert isinstance(model, ChunkedBatches)  # on a CPU
        for size in args.sizes:
            height, width = map(int, size.split("x"))
            images = torch.randn(args.batch, 3, height, width)
            mask = torch.zeros(args.batch, height, width, dtype=torch.bool)
            rates = {}
            with torch.inference_mode():
                for label, images_per_chunk in (("whole", None), (1, 1), (2, 2), (4, 4)):
                    # A budget of exactly that many images' pixels; None runs the batch whole.
                    pixels = (
                        10**12 if images_per_chunk is None else images_per_chunk * height * width
                    )
                    chunking.CPU_PIXELS_PER_FORWARD = pixels
                    rates[label] = images_per_second(model, images, mask, args.repeats)
                chunking.CPU_PIXELS_PER_FORWARD = budget
                pixels = chunking.cpu_pixels_per_forward(next(model.parameters()).dtype)
                default = min(args.batch, max(1, pixels // (height * width)))
                rates["default"] = images_per_second(model, images, mask, args.repeats)
            ratios = " / ".join(f"{rates[k] / rates['whole']:.2f}x" for k in (1, 2, 4))
            print(
                f"{name:16s} {size:>9s} {rates['whole']:11.2f}  {ratios} / "
                f"{rates['default'] / rates['whole']:.2f}x ({default} per chunk)",
                flush=True,
            )


if __name__ == "__main__":
    main()
