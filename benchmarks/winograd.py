"""Winograd F(4x4, 3x3) against torch's direct convolution on the ResNet-50's 3x3 stride-1 shapes.

    python benchmarks/winograd.py [--size 800 1066] [--repeats 9]

For each of the four stages' 3x3 convolutions at the sizes an ``--size`` image gives them
(channels-last fp32, batch 1, random weights), prints the shortest time of ``nn.Conv2d`` and of
``WinogradConv2d`` over the same weights, their ratio, and each one's largest error against the
same convolution computed in float64, over the largest output value.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from detrkit.ops import WinogradConv2d

# (channels, stride of the stage's maps, convolutions of that shape in a ResNet-50)
STAGES = ((64, 4, 3), (128, 8, 3), (256, 16, 5), (512, 32, 2))


def shortest_time(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}")
    print("channels  map        convs  direct     winograd   ratio  error direct / winograd")
    total_direct = total_winograd = 0.0
    for channels, stride, count in STAGES:
        height, width = (-(-side // stride) for side in args.size)
        conv = nn.Conv2d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last)
        winograd = WinogradConv2d.from_conv(conv)
        x = torch.randn(1, channels, height, width).to(memory_format=torch.channels_last)
        with torch.no_grad():
            exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            errors = [
                ((module(x).double() - exact).abs().max() / exact.abs().max()).item()
                for module in (conv, winograd)
            ]
            direct = shortest_time(conv, x, args.repeats)
            fast = shortest_time(winograd, x, args.repeats)
        total_direct += count * direct
        total_winograd += count * fast
        print(
            f"{channels:8d}  {height:4d}x{width:<4d}  {count:5d}  {direct * 1e3:6.1f} ms  "
            f"{fast * 1e3:6.1f} ms  {fast / direct:5.2f}  {errors[0]:.1e} / {errors[1]:.1e}"
        )
    print(
        f"all 13: direct {total_direct * 1e3:.0f} ms, winograd {total_winograd * 1e3:.0f} ms "
        f"({total_winograd / total_direct:.2f}x)"
    )


if __name__ == "__main__":
    main()
