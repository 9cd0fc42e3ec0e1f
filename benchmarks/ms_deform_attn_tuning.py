"""Launch configurations of the Triton deformable attention kernels, timed on a GPU.

    python benchmarks/ms_deform_attn_tuning.py [--batch 8] [--repeats 20]

For Deformable DETR's encoder and decoder at 800x1066 (the inputs of ``ms_deform_attn.py``,
repeated over ``--batch`` images), times the forward kernel in fp32 and bf16 and the backward in
fp32 under every (queries per program, warps) pair, and prints each median with the fastest
marked. The configuration in use is ``FORWARD_CONFIG`` / ``BACKWARD_CONFIG`` of
``detrkit.ops.ms_deform_attn_triton``; this script is how they were chosen.
"""

from __future__ import annotations

import argparse
import functools

import torch
from ms_deform_attn import make_inputs, median_seconds

FORWARD_CANDIDATES = [(q, w) for q in (16, 32, 64, 128) for w in (1, 2, 4, 8)]
BACKWARD_CANDIDATES = [(q, w) for q in (16, 32, 64) for w in (2, 4, 8)]


def batched(inputs, batch: int):
    """The inputs of one image repeated over ``batch`` images."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs
    value, sampling_locations, attention_weights = (
        t.expand(batch, *t.shape[1:]).contiguous()
        for t in (value, sampling_locations, attention_weights)
    )
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights


def sweep(name: str, run, candidates, device: str, repeats: int, current) -> None:
    from detrkit.ops.ms_deform_attn_triton import LaunchConfig

    timings = {}
    for block_q, num_warps in candidates:
        config = LaunchConfig(block_q, num_warps)
        # 3 warm-up calls: the first compiles.
        timings[config] = 1e3 * median_seconds(functools.partial(run, config), device, 3, repeats)
    best = min(timings, key=timings.get)
    print(f"\n{name}: ms per call (* fastest, = in use)")
    for config, ms in timings.items():
        marks = ("*" if config == best else " ") + ("=" if config == current else " ")
        print(f"  block_q {config.block_q:4d}  warps {config.num_warps}  {ms:8.3f} {marks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cpu only with TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    from detrkit.ops import ms_deform_attn_triton as kernels

    print(f"torch {torch.__version__}, batch {args.batch}, median of {args.repeats}")
    for case, num_queries in (("encoder", None), ("decoder", 300)):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = batched(make_inputs(num_queries, dtype, args.device), args.batch)
            sweep(
                f"{case} forward {dtype}",
                lambda config, inputs=inputs: kernels.forward(*inputs, config=config),
                FORWARD_CANDIDATES,
                args.device,
                args.repeats,
                kernels.FORWARD_CONFIG,
            )
        inputs = batched(make_inputs(num_queries, torch.float32, args.device), args.batch)
        grad_output = torch.randn_like(kernels.forward(*inputs))
        sweep(
            f"{case} backward torch.float32",
            lambda config, inputs=(*inputs, grad_output): kernels.backward(*inputs, config=config),
            BACKWARD_CANDIDATES,
            args.device,
            args.repeats,
            kernels.BACKWARD_CONFIG,
        )


if __name__ == "__main__":
    main()
