"""bf16 convolutions with their weights packed once for oneDNN (``detrkit.ops.onednn``, as
``optimize_for_inference(model, "bf16")`` runs them) against the same fused operator given the
plain weight, which torch reorders into oneDNN's blocked layout on every call.

    python benchmarks/packed_weights.py [--size 800 1066] [--rounds 7]

The convolutions are ResNet-50's 53 (channels-last, ReLU fused), each at the shape it has in
DETR's backbone for an image of ``--size``, each timed alone; the sums are the shortest of
``--rounds`` rounds, and the two forms alternate twice. Needs a CPU with bf16 arithmetic
(AVX-512 BF16 or AMX) to mean anything.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchvision.models import resnet50

from detrkit.cli.allocator import keep_freed_memory
from detrkit.ops import onednn


def convolution_inputs(size: tuple[int, int]) -> list[tuple[nn.Conv2d, torch.Tensor]]:
    """ResNet-50's convolutions in bf16 and an input of the shape each sees."""
    body = resnet50().eval().to(torch.bfloat16, memory_format=torch.channels_last)
    found = []

    def record(conv: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        found.append((conv, torch.randn_like(inputs[0])))

    hooks = [m.register_forward_pre_hook(record) for m in body.modules() if type(m) is nn.Conv2d]
    image = torch.randn(1, 3, *size).to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.inference_mode():
        body(image)
    for hook in hooks:
        hook.remove()
    return found


def plain_convolution(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    arguments = (conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return torch.ops.mkldnn._convolution_pointwise(x, *arguments, "relu", [], "")


def shortest_total(calls: list, rounds: int) -> float:
    """The shortest of ``rounds`` sums of one call of each, in seconds (after a warm-up round)."""
    totals = []
    for _ in range(rounds + 1):
        total = 0.0
        for call in calls:
            start = time.perf_counter()
            call()
            total += time.perf_counter() - start
        totals.append(total)
    return min(totals[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as the detrkit program runs: outputs reuse freed memory
    size = tuple(args.size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {size[0]}x{size[1]}"
    )
    # Made outside inference_mode: weights made inside keep no version counter and are not
    # packed (detrkit.ops.onednn.packed_weight).
    pairs = convolution_inputs(size)
    with torch.inference_mode():
        for conv, x in pairs:
            torch.testing.assert_close(
                onednn.conv2d_relu(conv, x), plain_convolution(conv, x), rtol=0, atol=0
            )
        times = {"packed": [], "plain": []}
        for _ in range(2):
            for form, run in (("packed", onednn.conv2d_relu), ("plain", plain_convolution)):
                calls = [lambda conv=conv, x=x, run=run: run(conv, x) for conv, x in pairs]
                times[form].append(shortest_total(calls, args.rounds))
    best = {form: min(values) for form, values in times.items()}
    print(
        f"  {len(pairs)} convolutions: packed {best['packed'] * 1e3:.1f} ms, plain "
        f"{best['plain'] * 1e3:.1f} ms, packed / plain {best['packed'] / best['plain']:.2f}x"
    )


if __name__ == "__main__":
    main()
