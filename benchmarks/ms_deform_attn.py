"""Times multi-scale deformable attention: PyTorch reference vs the fused kernel.

Run ``python benchmarks/ms_deform_attn.py`` for the fused CPU kernel, ``--device cuda`` for the
Triton kernels on a GPU (each against the reference on the same device). On the CPU it also
times the encoder's attention computed from the queries' projection, with the softmax and the
sampling locations inside the kernel against separate operators. Sizes are Deformable
DETR's for an 800x1066 image: the encoder (every pixel of the 4 levels is a query) and the decoder
(300 queries).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from detrkit.ops import (
    dispatch,
    fused_kernel_available,
    ms_deform_attn,
    ms_deform_attn_projected,
)

SPATIAL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
HEADS, CHANNELS, POINTS = 8, 32, 4  # M, D, P; d_model = M * D = 256


def pixel_centres() -> torch.Tensor:
    """Every level's pixel centres, normalised: ``[S, 2]`` (x, y)."""
    centres = []
    for h, w in SPATIAL_SHAPES:
        y, x = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        centres.append(torch.stack([x, y], -1).flatten(0, 1))
    return torch.cat(centres)


def make_inputs(num_queries: int | None, dtype: torch.dtype, device: str, seed: int = 0):
    """Realistic inputs: reference points in (0, 1) plus offsets of a few pixels per level,
    softmaxed attention weights. ``num_queries=None`` means the encoder (one query per pixel)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = areas.cumsum(0) - areas
    S, L = int(areas.sum()), len(SPATIAL_SHAPES)

    if num_queries is None:  # the encoder's reference points are the pixel centres
        reference_points = pixel_centres()  # [S, 2]
    else:
        reference_points = torch.rand(num_queries, 2, generator=generator)  # [Lq, 2]
    Lq = reference_points.shape[0]

    value = torch.randn(1, S, HEADS, CHANNELS, generator=generator)
    offsets_px = 2.0 * torch.randn(1, Lq, HEADS, L, POINTS, 2, generator=generator)
    level_sizes = spatial_shapes.flip(-1).float()[:, None]  # [L, 1, 2] as (W, H)
    sampling_locations = reference_points[:, None, None, None] + offsets_px / level_sizes
    # [1, Lq, M, L, P, 2] normalised (x, y)
    logits = torch.randn(1, Lq, HEADS, L * POINTS, generator=generator)
    attention_weights = logits.softmax(-1).view(1, Lq, HEADS, L, POINTS)
    floats = [t.to(device, dtype) for t in (value, sampling_locations, attention_weights)]
    return floats[0], spatial_shapes.to(device), level_start_index.to(device), *floats[1:]


def median_seconds(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_case(inputs, implementation: str, backward: bool, device: str, args) -> float:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    leaves = [
        t.detach().requires_grad_(backward) for t in (value, sampling_locations, attention_weights)
    ]
    grad_output = None

    def step():
        nonlocal grad_output
        out = ms_deform_attn(
            leaves[0],
            spatial_shapes,
            level_start_index,
            leaves[1],
            leaves[2],
            implementation=implementation,
        )
        if backward:
            if grad_output is None:
                grad_output = torch.randn_like(out)
            for leaf in leaves:
                leaf.grad = None
            out.backward(grad_output)

    with torch.set_grad_enabled(backward):
        return median_seconds(step, device, args.warmup, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: skipping the --device cuda benchmark")
        return
    if args.device == "cpu":
        fused = "cpu" if fused_kernel_available() else None
    else:
        fused = "triton" if dispatch.triton_available() else None
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats} after {args.warmup} warm-up runs, fused = {fused}"
    )
    if fused is None:
        print("(no fused kernel for this device: timing the reference only)")

    header = (
        f"{'case':<8} {'dtype':<9} {'pass':<9} {'reference ms':>13} {'fused ms':>9} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))
    for case, num_queries in (("encoder", None), ("decoder", 300)):
        for backward in (False, True):
            # bf16 rows compare against the fp32 reference too: that is what the kernel replaces.
            reference_inputs = make_inputs(num_queries, torch.float32, args.device)
            ref = time_case(reference_inputs, "reference", backward, args.device, args)
            for dtype in (torch.float32, torch.bfloat16) if fused else (torch.float32,):
                row = f"{case:<8} {str(dtype).removeprefix('torch.'):<9} "
                row += f"{'fwd+bwd' if backward else 'fwd':<9} {ref * 1e3:>13.1f}"
                if fused is not None:
                    inputs = make_inputs(num_queries, dtype, args.device)
                    fast = time_case(inputs, fused, backward, args.device, args)
                    row += f" {fast * 1e3:>9.2f} {ref / fast:>8.1f}x"
                print(row, flush=True)
    if fused == "cpu":
        print("\nencoder forward from the queries' projection (CPU inference):")
        for dtype in (torch.float32, torch.bfloat16):
            separate, inside = time_projected(dtype, args)
            print(
                f"  {str(dtype).removeprefix('torch.'):<9} softmax, locations and sampling apart "
                f"{separate * 1e3:.2f} ms, in the kernel {inside * 1e3:.2f} ms "
                f"({inside / separate:.2f}x)"
            )


def time_projected(dtype: torch.dtype, args) -> tuple[float, float]:
    """The encoder's attention from the queries' projection (offsets, then logits) and their
    reference points, CPU inference: the softmax, the locations and the sampling as separate
    operators, against ``ms_deform_attn_projected``, which computes the first two inside the
    kernel. Returns both times in seconds."""
    generator = torch.Generator().manual_seed(1)
    spatial_shapes = torch.tensor(SPATIAL_SHAPES, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = areas.cumsum(0) - areas
    S, L = int(areas.sum()), len(SPATIAL_SHAPES)
    points = HEADS * L * POINTS
    value = torch.randn(1, S, HEADS, CHANNELS, generator=generator).to(dtype)
    reference = pixel_centres()[None, :, None, :].expand(1, S, L, 2).contiguous()  # fp32
    offsets = 2.0 * torch.randn(1, S, points * 2, generator=generator)  # pixels
    logits = torch.randn(1, S, points, generator=generator)
    projection = torch.cat([offsets, logits], -1).to(dtype)
    normalizer = spatial_shapes.flip(-1).float()  # [L, 2] (W, H)

    def separate():
        offsets, logits = projection.split([points * 2, points], -1)
        weights = logits.reshape(1, S, HEADS, -1).softmax(-1, dtype=torch.float32)
        locations = (
            reference[:, :, None, :, None, :]
            + offsets.float().view(1, S, HEADS, L, POINTS, 2) / normalizer[:, None, :]
        )
        return ms_deform_attn(
            value, spatial_shapes, level_start_index, locations, weights.view(1, S, HEADS, L, -1)
        )

    def fused():
        return ms_deform_attn_projected(
            value, spatial_shapes, level_start_index, reference, projection
        )

    with torch.inference_mode():
        return tuple(median_seconds(f, "cpu", args.warmup, args.repeats) for f in (separate, fused))


if __name__ == "__main__":
    main()
