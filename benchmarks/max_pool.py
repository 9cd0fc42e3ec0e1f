"""The ResNet stem's max pooling: PyTorch's CPU kernel (which also writes an int64 index per
output value) against detrkit's channels-last kernel, alone and inside the optimized model.

    python benchmarks/max_pool.py [--precision bf16] [--rounds 60]

Alone: the 3x3, stride-2 pool of the stem's [1, 64, 400, 533] map of an 800x1066 image. In the
model: DETR-R50 (random weights) optimized for inference, against the same model with PyTorch's
pool put back; the outputs are checked equal. Interleaved rounds, medians in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import detrkit
from detrkit.cli.allocator import keep_freed_memory
from detrkit.fast import adopt, optimize_for_inference, substitute
from detrkit.fast.backbone import FastMaxPool2d
from detrkit.ops import max_pool2d


def interleaved(runs: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    keep_freed_memory()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    stem = torch.randn(1, 64, 400, 533).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2d(stem, 3, 2, 1), F.max_pool2d(stem, 3, 2, 1))
    with torch.inference_mode():
        alone = interleaved(
            {
                "pytorch": lambda: F.max_pool2d(stem, 3, 2, 1),
                "detrkit": lambda: max_pool2d(stem, 3, 2, 1),
            },
            args.rounds * 5,
        )
    print(
        f"stem pool alone, {args.precision}: " + ", ".join(f"{k} {v:.2f}" for k, v in alone.items())
    )
    torch.manual_seed(0)
    model = detrkit.build_model("detr_r50").eval()
    fast = optimize_for_inference(model, args.precision)
    plain = substitute(
        optimize_for_inference(model, args.precision),
        {FastMaxPool2d: lambda module: adopt(module, nn.MaxPool2d)},
    )
    images = torch.randn(1, 3, 800, 1066)
    mask = torch.zeros(1, 800, 1066, dtype=torch.bool)
    with torch.inference_mode():
        ours, theirs = fast(images, mask), plain(images, mask)
        assert all(torch.equal(ours[k], theirs[k]) for k in ("pred_logits", "pred_boxes"))
        whole = interleaved(
            {
                "pytorch's pool": lambda: plain(images, mask),
                "detrkit's pool": lambda: fast(images, mask),
            },
            args.rounds,
        )
    ratio = whole["detrkit's pool"] / whole["pytorch's pool"]
    figures = ", ".join(f"{k} {v:.1f}" for k, v in whole.items())
    print(f"DETR-R50 {args.precision}, 800x1066: {figures} ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
