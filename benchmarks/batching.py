"""Throughput of a batch run whole or in chunks of images on a CPU: what sets
``detrkit.fast.chunking.CPU_PIXELS_PER_FORWARD``.

    python benchmarks/batching.py [--models detr_r50 deformable_detr] [--batch 8] [--rounds 3]
                                  [--sizes 800x1066 400x533 300x400 200x266] [--precision bf16]
                                  [--keep-freed-memory]

For every model and image size: images/s of the model prepared by ``optimize_for_inference``
(random weights) on a batch of ``--batch`` images run whole, in chunks of 1, 2 and 4 images, and
as ``optimize_for_inference`` sets it (chunks of ``cpu_pixels_per_forward`` pixels for the
precision), each as a multiple of the whole batch's rate. The ways take turns in every round (an
untimed call, then two timed); rates are from the median call of each. ``--keep-freed-memory``
has malloc keep freed blocks for reuse, as the ``detrkit`` program does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detrkit.cli.allocator import keep_freed_memory
from detrkit.fast import chunking, optimize_for_inference
from detrkit.fast.chunking import ChunkedBatches
from detrkit.models import build_model

CHUNKS = ("whole", 1, 2, 4, "default")


def budget(chunk: str | int, height: int, width: int, dtype: torch.dtype, default: int) -> int:
    """The ``CPU_PIXELS_PER_FORWARD`` that has a model of ``dtype`` run ``chunk`` images per
    forward (``"whole"``: all of them; ``"default"``: the library's own budget). The model scales
    the budget, given in fp32 pixels, to its dtype's bytes (``cpu_pixels_per_forward``)."""
    if chunk == "whole":
        return 10**12
    if chunk == "default":
        return default
    return chunk * height * width * dtype.itemsize // torch.float32.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr_r50", "deformable_detr"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["800x1066", "400x533", "300x400", "200x266"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory: malloc's settings are set by the environment or absent")
    default = chunking.CPU_PIXELS_PER_FORWARD
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.precision}, freed memory {'kept' if args.keep_freed_memory else 'returned'}"
    )
    print(f"{'model':16s} {'size':>9s} {'whole img/s':>11s}  chunks of 1 / 2 / 4 / default")
    for name in args.models:
        torch.manual_seed(0)
        model = optimize_for_inference(build_model(name), args.precision)
        assert isinstance(model, ChunkedBatches)  # on a CPU
        dtype = next(model.parameters()).dtype
        for size in args.sizes:
            height, width = map(int, size.split("x"))
            images = torch.randn(args.batch, 3, height, width)
            mask = torch.zeros(args.batch, height, width, dtype=torch.bool)
            times: dict = {chunk: [] for chunk in CHUNKS}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for chunk in CHUNKS:
                        chunking.CPU_PIXELS_PER_FORWARD = budget(
                            chunk, height, width, dtype, default
                        )
                        model(images, mask)
                        for _ in range(2):
                            start = time.perf_counter()
                            model(images, mask)
                            times[chunk].append(time.perf_counter() - start)
            chunking.CPU_PIXELS_PER_FORWARD = default
            rates = {chunk: args.batch / statistics.median(t) for chunk, t in times.items()}
            per_chunk = min(
                args.batch, max(1, chunking.cpu_pixels_per_forward(dtype) // (height * width))
            )
            ratios = " / ".join(f"{rates[k] / rates['whole']:.2f}x" for k in (1, 2, 4))
            print(
                f"{name:16s} {size:>9s} {rates['whole']:11.2f}  {ratios} / "
                f"{rates['default'] / rates['whole']:.2f}x ({per_chunk} per chunk)",
                flush=True,
            )


if __name__ == "__main__":
    main()
