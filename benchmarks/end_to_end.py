"""End-to-end latency of detrkit against Hugging Face transformers on the same weights and input.

    python benchmarks/end_to_end.py [--models detr deformable_detr] [--repeats 5] [--size 800 1066]
                                    [--batch 8] [--profile N] [--compile] [--bf16]
                                    [--no-memory] [--stages] [--keep-freed-memory]

For each model a randomly initialised transformers model is saved with save_pretrained and loaded
with detrkit.load (so both run the very same weights); all then run the same normalised image,
batch 1, in inference mode. Prints, in one run:

- latency: the median and the shortest time of transformers fp32, detrkit fp32 as loaded and
  detrkit prepared by ``optimize_for_inference`` (fp32: batch norm folded, channels-last; with
  ``--compile`` also that model compiled by ``torch.compile``), timed in interleaved rounds, each
  as a fraction of transformers', and how far the logits are from transformers';
- throughput of the prepared model at ``--batch`` images: images/s, and the GFLOP/s it achieves
  on the convolutions and matrix products of the model as loaded (counted by torch's
  FlopCounterMode; Winograd's convolutions do fewer for the same result) as a fraction of the
  machine's fp32 matrix-multiply peak (the best of measurements at the start of the run and
  right after the throughput's);
- peak memory of one batch-1 forward of each (growth of the resident set, one subprocess each);
- with ``--profile N``, the N operators of detrkit with the most self CPU time, both ways;
- with ``--stages``, the wall time of detrkit's backbone, encoder and decoder, both ways
  (forward hooks, no profiler: the profiler inflates small operators several times over);
- with ``--keep-freed-memory``, all of it with glibc's malloc keeping freed memory for reuse, as
  the ``detrkit`` program runs (``detrkit.cli.allocator``);
- with ``--bf16``, the prepared model in bf16 and its distance from fp32. On a CPU with bf16
  arithmetic (AVX-512 BF16 or AMX) it joins the interleaved rounds, and its throughput is given
  against the bf16 matrix-multiply peak; elsewhere it is one run without a warm-up (such a CPU
  runs bf16 matrix products very slowly: one forward of Deformable DETR takes minutes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import detrkit
from detrkit.cli.allocator import keep_freed_memory
from detrkit.fast import optimize_for_inference

IMPLEMENTATIONS = ("transformers", "detrkit", "optimized")


def hf_model(name: str):
    import transformers

    transformers.utils.logging.disable_progress_bar()

    if name == "detr":
        config = transformers.DetrConfig(auxiliary_loss=False)
        return transformers.DetrForObjectDetection(config).eval()
    config = transformers.DeformableDetrConfig()
    return transformers.DeformableDetrForObjectDetection(config).eval()


def add_keep_freed_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run with glibc's malloc keeping freed memory, as the detrkit program does (for "
        "every implementation: the setting is process-wide)",
    )


def apply_keep_freed_memory_option(parser: argparse.ArgumentParser, args) -> None:
    if args.keep_freed_memory and not keep_freed_memory():
        parser.error("--keep-freed-memory: malloc's settings could not be made here")


def synchronize(device: torch.device) -> None:
    """Waits for the GPU's queued work (timings of GPU work must end with it); no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, one-time kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """The best GFLOP/s of a square matrix product in ``dtype`` on this machine, now."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def cpu_has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8, help="batch of the throughput figure")
    parser.add_argument("--bf16", action="store_true", help="also time the model in bf16")
    parser.add_argument(
        "--compile", action="store_true", help="also time the model compiled by torch.compile"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N operators of detrkit"
    )
    parser.add_argument(
        "--stages", action="store_true", help="time detrkit's backbone, encoder and decoder"
    )
    add_keep_freed_memory_option(parser)
    parser.add_argument("--memory-of", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:  # the subprocess of measure_memory
        print(json.dumps(forward_memory(args.memory_of, args.weights, args.size)))
        return

    apply_keep_freed_memory_option(parser, args)
    torch.manual_seed(0)
    images = torch.randn(1, 3, *args.size)
    mask = torch.zeros(1, *args.size, dtype=torch.bool)
    peak = matmul_peak()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, input "
        f"{tuple(images.shape)}, fp32 matmul peak {peak:.1f} GFLOP/s (2048^3, best of 10)"
    )
    for name in args.models:
        compare(name, images, mask, args, peak)


def compare(name: str, images: torch.Tensor, mask: torch.Tensor, args, peak: float) -> None:
    """Every figure of one model: latency, profile, throughput, memory and optionally bf16."""
    hf = hf_model(name)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = detrkit.load(directory)
        optimized = optimize_for_inference(ours)
        pixel_mask = (~mask).long()
        runs = {
            "transformers": lambda: hf(pixel_values=images, pixel_mask=pixel_mask),
            "detrkit": lambda: ours(images, mask),
            "optimized": lambda: optimized(images, mask),
        }
        timed_bf16 = args.bf16 and cpu_has_bf16_arithmetic()
        if timed_bf16:
            low = optimize_for_inference(ours, "bf16")
            runs["optimized bf16"] = lambda: low(images, mask)
        with torch.inference_mode():
            if args.compile:
                runs["compiled"] = compiled_run(ours, images, mask)
            logits = {key: _logits(run()) for key, run in runs.items()}  # also the warm-up
            times = interleaved_times(runs, args.repeats)
        print_latency(name, times, logits, args.repeats)
        models = {"detrkit": ours, "optimized": optimized}
        if timed_bf16:
            models["optimized bf16"] = low
        if args.profile:
            for key in models:
                print_profile(key, runs[key], args.profile)
        if args.stages:
            for key, model in models.items():
                print_stages(key, model, runs[key], args.repeats)
        throughput(optimized, ours, images, mask, args.batch, peak)
        if timed_bf16:
            diff = (logits["optimized bf16"] - logits["optimized"]).abs().max()
            print(f"  optimized bf16: logits' max |diff| from optimized fp32 {diff:.1e}")
            bf16_peak = matmul_peak(dtype=torch.bfloat16)
            throughput(low, ours, images, mask, args.batch, bf16_peak, torch.bfloat16)
        if not args.no_memory:
            measure_memory(directory, args.size)
        if args.bf16 and not timed_bf16:
            bf16_row(
                ours, images, mask, logits["optimized"], statistics.median(times["transformers"])
            )


def interleaved_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """``repeats`` rounds, each timing every implementation once: on a shared machine a change of
    load then falls on all of them instead of on whichever ran at the time."""
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(_timed(run))
    return times


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def print_latency(name: str, times: dict, logits: dict, repeats: int) -> None:
    print(f"\n{name}, batch 1, {repeats} interleaved rounds after a warm-up: median (min)")
    reference = times["transformers"]
    for key, found in times.items():
        median, best = statistics.median(found), min(found)
        ratio, best_ratio = median / statistics.median(reference), best / min(reference)
        diff = (logits[key] - logits["transformers"]).abs().max()
        print(
            f"  {key:14s} {median:8.3f} s ({best:6.3f} s) {ratio:6.2f}x ({best_ratio:4.2f}x)"
            f"   max |diff| {diff:.1e}"
        )


def _logits(outputs) -> torch.Tensor:
    return (outputs.logits if hasattr(outputs, "logits") else outputs["pred_logits"]).float()


def print_profile(key: str, run, rows: int, inference: bool = True) -> None:
    """The ``rows`` operators with the most self CPU time in one call of ``run`` (after the
    warm-ups), in inference mode unless ``inference`` is False (a training step)."""
    with torch.inference_mode(inference), profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events)
    print(f"  {key}: top operators by self CPU time, of {total / 1e6:.2f} s in all")
    for event in events[:rows]:
        share = event.self_cpu_time_total / total
        milliseconds = event.self_cpu_time_total / 1e3
        print(f"    {event.key:48s} {milliseconds:9.1f} ms {share:6.1%} {event.count:5d} calls")


def print_stages(key: str, model, run, repeats: int) -> None:
    """Median wall time, over ``repeats`` calls of ``run``, of each stage of ``model``."""
    stages = {
        "backbone": model.backbone,
        "encoder": model.transformer.encoder,
        "decoder": model.transformer.decoder,
    }
    spent = {name: [] for name in (*stages, "total")}
    starts = {}
    handles = []
    for name, module in stages.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda *_, n=name: starts.__setitem__(n, time.perf_counter())
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda *_, n=name: spent[n].append(time.perf_counter() - starts[n])
            )
        )
    with torch.inference_mode():
        for _ in range(repeats):
            spent["total"].append(_timed(run))
    for handle in handles:
        handle.remove()
    medians = {name: statistics.median(times) for name, times in spent.items()}
    medians["rest"] = medians["total"] - sum(medians[name] for name in stages)
    print(f"  {key}: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in medians.items()))


def throughput(
    model,
    reference,
    images: torch.Tensor,
    mask: torch.Tensor,
    batch: int,
    peak: float,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Images/s of ``model`` at ``batch`` copies of the image, and its rate in GFLOP/s of the
    work counted in ``reference`` (the model as loaded: direct convolutions, whereas Winograd's
    do fewer multiplications for the same result) as a fraction of the matrix-multiply peak in
    ``dtype`` (the model's): the best of ``peak`` GFLOP/s and a measurement right after."""
    images, mask = images.expand(batch, -1, -1, -1).clone(), mask.expand(batch, -1, -1).clone()
    with torch.inference_mode():
        # The FLOP counter's module tracker hooks the autograd graph of parameters that require
        # gradients, which inference mode does not build.
        reference = copy.deepcopy(reference).requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter:
            reference(images[:1], mask[:1])
        seconds = min(_timed(lambda: model(images, mask)) for _ in range(2))  # first warms up
    gflop = counter.get_total_flops() / 1e9  # per image: convolutions and matrix products
    rate = gflop * batch / seconds
    # The peak again, right after: the best of both, in case other jobs slowed the first one.
    peak = max(peak, matmul_peak(dtype=dtype))
    label = "optimized" if dtype == torch.float32 else f"optimized {_DTYPE_NAMES[dtype]}"
    print(
        f"  {label}, batch {batch}: {batch / seconds:.2f} images/s, {gflop:.0f} GFLOP/image "
        f"(conv + matmul, as loaded), {rate:.1f} GFLOP/s = {rate / peak:.0%} of the "
        f"{_DTYPE_NAMES[dtype]} matmul peak ({peak:.1f} GFLOP/s)"
    )


def measure_memory(directory: str, size: list[int]) -> None:
    """Peak memory of one forward of each implementation, each in a fresh process."""
    # Every allocation above 64 kB gets its own mapping, returned to the system when freed, so
    # that the resident set follows what is allocated (glibc would keep freed memory around).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    found = {}
    for key in IMPLEMENTATIONS:
        command = [sys.executable, __file__, "--memory-of", key, "--weights", directory]
        command += ["--size", *map(str, size)]
        result = subprocess.run(
            command, capture_output=True, text=True, check=True, env=environment
        )
        found[key] = json.loads(result.stdout.splitlines()[-1])["peak_mb"]
    print("  peak memory of a forward: " + ", ".join(f"{k} {v:.0f} MB" for k, v in found.items()))


def forward_memory(key: str, directory: str, size: list[int]) -> dict:
    """How far one forward raises the resident set above what model and input hold."""
    if key == "transformers":
        import transformers

        model = transformers.AutoModelForObjectDetection.from_pretrained(directory).eval()
    else:
        model = detrkit.load(directory)
        if key == "optimized":
            model = optimize_for_inference(model)
    images = torch.randn(1, 3, *size)
    mask = torch.zeros(1, *size, dtype=torch.bool)
    inputs = {"pixel_values": images, "pixel_mask": (~mask).long()}
    with torch.inference_mode():
        # A warm-up first: one-time allocations (thread pools, kernel caches) are not the forward's.
        model(**inputs) if key == "transformers" else model(images, mask)
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the RSS now
        model(**inputs) if key == "transformers" else model(images, mask)
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def compiled_run(model, images: torch.Tensor, mask: torch.Tensor):
    """The prepared fp32 model compiled by torch.compile, warmed up; prints the compile time."""
    compiled = optimize_for_inference(model, compile=True)
    start = time.perf_counter()
    compiled(images, mask)
    print(f"  (torch.compile: the first call took {time.perf_counter() - start:.0f} s)")
    # The next calls are slow too (oneDNN builds its primitives for the frozen weights).
    compiled(images, mask)
    compiled(images, mask)
    return lambda: compiled(images, mask)


def bf16_row(model, images, mask, fp32_logits: torch.Tensor, hf_time: float) -> None:
    """One timed forward of the model in bf16, against fp32. No warm-up: without AMX or AVX-512
    BF16 one forward of Deformable DETR takes minutes."""
    low = optimize_for_inference(model, "bf16")
    with torch.inference_mode():
        start = time.perf_counter()
        logits = _logits(low(images, mask))
        seconds = time.perf_counter() - start
    diff = (logits - fp32_logits).abs().max()
    print(
        f"  optimized bf16 {seconds:8.3f} s {seconds / hf_time:6.2f}x of transformers fp32, "
        f"max |diff| from fp32 {diff:.1e}"
    )


if __name__ == "__main__":
    main()
