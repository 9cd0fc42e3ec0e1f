"""Times DETR's multi-head attention in bf16 CPU inference: detrkit's AMX kernel
(``detrkit.ops.dot_product_attention``) against torch's ``scaled_dot_product_attention`` on the
same inputs, and prints the ratio of each.

    python benchmarks/dot_product_attention.py [--repeats 15]

Sizes are DETR-R50's for an 800x1066 image (a 25x34 C5 map, 8 heads of 32 channels): the
encoder's self-attention (850 queries and keys) at batch 1 and 8, the decoder's cross-attention
(100 queries, 850 keys) and its self-attention (100 and 100). The query is a strided view, as the
packed projection's chunks are. Each time is the median of ``--repeats`` calls, the two
implementations alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from detrkit.cli.allocator import keep_freed_memory
from detrkit.ops import dot_product_attention, dot_product_kernel_applies

HEADS, HEAD_DIM = 8, 32
CASES = {  # name: (batch, queries, keys)
    "encoder self-attention, batch 1": (1, 850, 850),
    "encoder self-attention, batch 8": (8, 850, 850),
    "decoder cross-attention": (1, 100, 850),
    "decoder self-attention": (1, 100, 100),
}


def torchs(query, key, value) -> torch.Tensor:
    """torch's attention on the same [B, L, C] tensors, heads split as views."""
    q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(query.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    keep_freed_memory()
    channels = HEADS * HEAD_DIM
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16")
    print(f"{'case':34s} {'detrkit ms':>10s} {'torch ms':>9s} {'ratio':>6s}")
    for name, (batch, queries, keys) in CASES.items():
        g = torch.Generator().manual_seed(0)
        query = torch.randn(batch, queries, 2 * channels, generator=g).bfloat16()[..., :channels]
        key = torch.randn(batch, keys, channels, generator=g).bfloat16()
        value = torch.randn(batch, keys, channels, generator=g).bfloat16()
        if not dot_product_kernel_applies(query, key, value, HEADS, None):
            raise SystemExit("detrkit's attention kernel does not run here (it needs AMX)")
        tensors = (query, key, value)
        runs = {
            "detrkit": lambda tensors=tensors: dot_product_attention(*tensors, HEADS),
            "torch": lambda tensors=tensors: torchs(*tensors),
        }
        times: dict[str, list[float]] = {label: [] for label in runs}
        with torch.inference_mode():
            for run in runs.values():  # warm-up
                run()
            for _ in range(args.repeats):
                for label, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[label].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[label]) * 1e3 for label in runs)
        print(f"{name:34s} {ours:10.3f} {theirs:9.3f} {ours / theirs:5.2f}x")


if __name__ == "__main__":
    main()
