"""DETR and Deformable DETR on a GPU against Hugging Face transformers: latency, throughput, memory.

    python benchmarks/gpu.py [--models detr deformable_detr] [--size 800 1066] [--batch 8]
                             [--repeats 20] [--device cuda] [--profile N] [--compile]

For each model a randomly initialised transformers model is saved with save_pretrained and loaded
with detrkit.load, so both run the same weights on the same normalised image. Timed (after
warm-ups, with the device synchronised around each call):

- transformers fp32, and transformers under bf16 autocast;
- detrkit prepared by ``optimize_for_inference`` in fp32, bf16 and fp16, Deformable DETR's
  attention on the fused Triton kernels (``implementation="triton"``), and for Deformable DETR
  once more in fp32 with the grid_sample reference attention; with ``--compile``, detrkit fp32
  and bf16 compiled by ``torch.compile`` too.

Prints per path: batch-1 latency (median), images/s at ``--batch``, the peak of allocated GPU
memory in a batch-1 forward, the largest difference of the logits from transformers fp32, and
the throughput as a multiple of transformers fp32's. ``--device cpu`` runs the same script on the
CPU (fp16 and the Triton kernels left out), to check the script itself.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import torch
from end_to_end import hf_model, synchronize

import detrkit
from detrkit.fast import optimize_for_inference
from detrkit.models import DeformableDETR
from detrkit.ops import attention_implementation, dispatch


def seconds_per_call(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(run, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def paths(hf: torch.nn.Module, directory: str, device: torch.device, compile: bool) -> dict:
    """Every path to time: its name -> a callable on (images, mask) that returns the logits.
    ``directory`` holds ``hf``'s weights, saved with save_pretrained."""
    hf = hf.to(device)
    ours = detrkit.load(directory, map_location=device)

    def hf_run(images, mask, dtype=None):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return hf(pixel_values=images, pixel_mask=(~mask).long()).logits

    found = {
        "transformers fp32": lambda images, mask: hf_run(images, mask),
        "transformers bf16 autocast": lambda images, mask: hf_run(images, mask, torch.bfloat16),
    }
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    triton = device.type == "cuda" and dispatch.triton_available()
    deformable = isinstance(ours, DeformableDETR)
    for precision in precisions:
        model = optimize_for_inference(ours, precision)
        if triton and deformable and precision == "fp32":  # what the Triton kernels are worth
            found["detrkit fp32, grid_sample attn"] = logits_of(model, "reference")
        found[f"detrkit {precision}"] = logits_of(model, "triton" if triton else "auto")
    if compile:  # "auto" attention: the Triton kernels on a GPU
        for precision in ("fp32", "bf16"):
            compiled = optimize_for_inference(ours, precision, compile=True)
            found[f"detrkit {precision} compiled"] = logits_of(compiled)
    return found


def logits_of(model: torch.nn.Module, attention: str = "auto"):
    def run(images, mask):
        with attention_implementation(attention):
            return model(images, mask)["pred_logits"]

    return run


def print_gpu_profile(key: str, run, rows: int) -> None:
    """The ``rows`` operators with the most self GPU time in one call of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(event.self_device_time_total for event in events)
    print(f"  {key}: top operators by self GPU time, of {total / 1e3:.1f} ms in all")
    if total == 0:  # no GPU activity was recorded
        return
    for event in events[:rows]:
        share = event.self_device_time_total / total
        milliseconds = event.self_device_time_total / 1e3
        print(
            f"    {event.key[:60]:60s} {milliseconds:8.2f} ms {share:6.1%} {event.count:5d} calls"
        )


def compare(name: str, args, device: torch.device) -> None:
    torch.manual_seed(0)
    images = torch.randn(1, 3, *args.size, device=device)
    mask = torch.zeros(1, *args.size, dtype=torch.bool, device=device)
    batch_images = images.expand(args.batch, -1, -1, -1).contiguous()
    batch_mask = mask.expand(args.batch, -1, -1).contiguous()
    with tempfile.TemporaryDirectory() as directory:
        hf = hf_model(name)
        hf.save_pretrained(directory)
        with torch.inference_mode():
            runs = paths(hf, directory, device, args.compile)
            reference = runs["transformers fp32"](images, mask).float()
            rows = {}
            for key, run in runs.items():
                single = functools.partial(run, images, mask)
                batch = functools.partial(run, batch_images, batch_mask)
                latency = seconds_per_call(single, device, args.repeats)
                batch_seconds = seconds_per_call(batch, device, max(3, args.repeats // 4))
                difference = (single().float() - reference).abs().max().item()
                rows[key] = (latency, args.batch / batch_seconds, peak_memory_mb(single, device))
                rows[key] += (difference,)
            if args.profile and device.type == "cuda":
                for key in ("transformers fp32", "detrkit fp32", "detrkit bf16"):
                    print_gpu_profile(
                        f"{name}, {key}, batch {args.batch}",
                        functools.partial(runs[key], batch_images, batch_mask),
                        args.profile,
                    )
    print(f"\n{name}, {tuple(images.shape[-2:])}, {device}")
    base = rows["transformers fp32"][1]
    print(
        f"  {'path':28s} {'batch 1 ms':>10s} {f'batch {args.batch} img/s':>14s} "
        f"{'x transformers':>14s} {'peak MB':>8s} {'max |diff|':>10s}"
    )
    for key, (latency, rate, memory, difference) in rows.items():
        shown = f"{memory:8.0f}" if memory is not None else f"{'-':>8s}"
        print(
            f"  {key:28s} {latency * 1e3:10.2f} {rate:14.1f} {rate / base:13.2f}x "
            f"{shown} {difference:10.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"])
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time detrkit fp32 and bf16 compiled by torch.compile (minutes to compile)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N operators with the most GPU time at --batch, for transformers fp32 "
        "and detrkit fp32 and bf16",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--device cpu checks the script on the CPU)")
        return
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}")
    for model_name in args.models:
        compare(model_name, args, device)


if __name__ == "__main__":
    main()
