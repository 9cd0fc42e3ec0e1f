"""detrkit against the CPU runtimes a deployer would use instead: ONNX Runtime and OpenVINO, each
running detrkit's own ONNX export of the same model.

    pip install -e '.[bench]'   # onnxruntime, openvino (and the export extra)
    python benchmarks/runtimes.py [--models detr_r50 deformable_detr] [--batches 1 8]
                                  [--repeats 3] [--size 800 1066] [--only NAME ...]
                                  [--openvino-static]

Each model is built from its preset with random weights (seed 0), exported once with
``detrkit.export`` at the benchmark size (the file takes any batch and size) and run, in one
process, by:

- ``onnxruntime fp32``: ONNX Runtime's CPU provider, all graph optimisations;
- ``onnxruntime fp32 op``, ``openvino f32 op``, ``openvino default op`` (Deformable DETR): the
  same on a second export, made with ``attention_op="detrkit"``, whose attention is one node run
  by detrkit's library for each runtime (``detrkit.ops.onnxruntime_library``, which needs ONNX
  Runtime's C API headers, and ``detrkit.ops.openvino_extension``);
- ``openvino f32``: OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT=f32``;
- ``openvino default``: OpenVINO's CPU plugin as it comes (bf16 on CPUs with AMX or AVX-512 BF16);
  with ``--openvino-static``, both OpenVINO models are compiled for the benchmark's input shapes
  (a file for one input size), otherwise for any;
- ``detrkit fp32`` and ``detrkit bf16``: ``detrkit.optimize_for_inference(model, precision)``.

Every runtime uses as many threads as torch does. Rounds are interleaved: each round gives every
runtime a turn of three calls in a row, the first untimed (the previous runtime's idle threads
still spin on the cores then), the other two timed; the median of the ``--repeats`` rounds' timed
calls is reported.
Each output column is the largest absolute difference of ``pred_logits`` and ``pred_boxes`` from
the reference model (``models/``, fp32). Ratios compare detrkit with the fastest peer of the
same precision: below 1 means detrkit is faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import detrkit
from detrkit.cli.allocator import keep_freed_memory
from detrkit.deploy.runtime import onnxruntime_options
from detrkit.fast import optimize_for_inference
from detrkit.ops import openvino_extension

OUTPUTS = ("pred_logits", "pred_boxes")
CALLS_PER_TURN = 2  # timed calls of a runtime in a row, after one untimed
# The runtimes of the export with detrkit's attention node.
OP_RUNTIMES = ("onnxruntime fp32 op", "openvino f32 op", "openvino default op")
Run = Callable[[], dict[str, np.ndarray]]


def onnxruntime_run(path: Path, feeds: dict[str, np.ndarray], threads: int) -> Run:
    import onnxruntime

    options = onnxruntime_options(path, threads)  # with detrkit's operators where the file has them
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: dict(zip(OUTPUTS, session.run(list(OUTPUTS), feeds)))


def openvino_run(
    path: Path,
    feeds: dict[str, np.ndarray],
    threads: int,
    precision: str | None,
    static: bool = False,
) -> tuple[Run, str]:
    """An OpenVINO CPU request on ``path``; ``precision`` None keeps the plugin's default;
    ``static`` fixes the inputs' shapes to the feeds' before compiling (``Model.reshape``), as a
    deployment with one input size can. Also returns the precision the plugin chose."""
    import openvino

    core = openvino.Core()
    core.add_extension(str(openvino_extension()))  # read by the files with detrkit's node
    properties = {"INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        properties["INFERENCE_PRECISION_HINT"] = precision
    model = core.read_model(str(path))
    if static:
        model.reshape({name: list(array.shape) for name, array in feeds.items()})
    compiled = core.compile_model(model, "CPU", properties)
    request = compiled.create_infer_request()
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def run() -> dict[str, np.ndarray]:
        results = request.infer(feeds)
        by_name = {output.get_any_name(): value for output, value in results.items()}
        return {name: by_name[name] for name in OUTPUTS}

    return run, chosen


def detrkit_run(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> Run:
    def run() -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = model(images, mask)
        return {name: outputs[name].float().numpy() for name in OUTPUTS}

    return run


def interleaved_medians(runs: dict[str, Run], repeats: int) -> dict[str, float]:
    """The median seconds of each run over ``repeats`` rounds. Each round calls every runtime
    in turn, 1 + CALLS_PER_TURN times: the first call of a turn is not timed, as it shares the
    cores with the previous runtime's idle threads, which spin for a while after its last call
    (OpenMP's and TBB's wait policies); the calls after it are timed, back to back as a
    deployment runs images."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            run()
            for _ in range(CALLS_PER_TURN):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def compare(name: str, args: argparse.Namespace, threads: int) -> None:
    torch.manual_seed(0)
    model = detrkit.build_model(name).eval()
    height, width = args.size
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"{name}.onnx"
        start = time.perf_counter()
        # verify=False: the differences below are measured on the benchmark's own inputs.
        detrkit.export(model, path, size=(height, width), verify=False)
        print(f"{name}: exported in {time.perf_counter() - start:.0f} s")
        op_path = Path(directory) / f"{name}_op.onnx"
        with_op = model.config.model_type == "deformable_detr" and any(
            wanted(key, args) for key in OP_RUNTIMES
        )
        if with_op:
            detrkit.export(
                model, op_path, size=(height, width), verify=False, attention_op="detrkit"
            )
        optimized = {p: optimize_for_inference(model, p) for p in ("fp32", "bf16")}
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            images = torch.randn(batch, 3, height, width, generator=generator)
            mask = torch.zeros(batch, height, width, dtype=torch.bool)
            feeds = {"images": images.numpy(), "mask": mask.numpy()}
            runs: dict[str, Run] = {}
            chosen = {}
            if wanted("onnxruntime fp32", args):
                runs["onnxruntime fp32"] = onnxruntime_run(path, feeds, threads)
            if with_op and wanted("onnxruntime fp32 op", args):
                runs["onnxruntime fp32 op"] = onnxruntime_run(op_path, feeds, threads)
            for suffix, file in [("", path), (" op", op_path)]:
                for precision, hint in (("f32", "f32"), ("default", None)):
                    key = f"openvino {precision}{suffix}"
                    if (file == path or with_op) and wanted(key, args):
                        runs[key], chosen[key] = openvino_run(
                            file, feeds, threads, hint, args.openvino_static
                        )
            for precision, fast in optimized.items():
                if wanted(f"detrkit {precision}", args):
                    runs[f"detrkit {precision}"] = detrkit_run(fast, images, mask)
            with torch.inference_mode():
                reference = model(images, mask)
            differences = {}
            for key, run in runs.items():  # also each one's warm-up call
                outputs = run()
                differences[key] = max(
                    float(np.abs(outputs[o] - reference[o].numpy()).max()) for o in OUTPUTS
                )
            times = interleaved_medians(runs, args.repeats)
            report(name, batch, times, differences, chosen)


def wanted(runtime: str, args: argparse.Namespace) -> bool:
    return not args.only or runtime in args.only


def report(
    name: str,
    batch: int,
    times: dict[str, float],
    differences: dict[str, float],
    chosen: dict[str, str],
) -> None:
    print(f"\n{name}, batch {batch}")
    print(f"  {'runtime':22s}{'median s':>10s}{'images/s':>10s}{'max |diff|':>12s}")
    for key, seconds in times.items():
        note = f"  (runs {chosen[key]})" if key in chosen else ""
        print(f"  {key:22s}{seconds:10.3f}{batch / seconds:10.2f}{differences[key]:12.1e}{note}")
    peers = {
        "fp32": [
            k
            for k in ("onnxruntime fp32", "onnxruntime fp32 op", "openvino f32", "openvino f32 op")
            if k in times
        ],
        "bf16": [k for k in ("openvino default", "openvino default op") if k in times],
    }
    for precision, keys in peers.items():
        ours = f"detrkit {precision}"
        if ours in times and keys:
            fastest = min(keys, key=times.__getitem__)
            ratio = times[ours] / times[fastest]
            print(f"  {ours} / {fastest}: {ratio:.2f}x")
    if "detrkit fp32" in times:
        # How far each runtime is from detrkit's own fp32 time (the exports' target is 1.5x).
        for key in peers["fp32"]:
            print(f"  {key} / detrkit fp32: {times[key] / times['detrkit fp32']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr_r50", "deformable_detr"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="RUNTIME",
        choices=[
            "onnxruntime fp32",
            "onnxruntime fp32 op",
            "openvino f32",
            "openvino default",
            "openvino f32 op",
            "openvino default op",
            "detrkit fp32",
            "detrkit bf16",
        ],
        help="time only these runtimes (quote the names)",
    )
    parser.add_argument(
        "--openvino-static",
        action="store_true",
        help="compile OpenVINO's models for the benchmark's input shapes (Model.reshape)",
    )
    args = parser.parse_args()
    for package in ("onnxruntime", "openvino"):
        try:
            __import__(package)
        except ModuleNotFoundError:
            sys.exit(f"{package} is missing: pip install -e '.[bench]'")
    # The headers `make test` unpacks, where no others are set (detrkit's ONNX Runtime library).
    unpacked = Path(__file__).resolve().parents[1] / "build/onnxruntime/include/onnxruntime"
    if "ONNXRUNTIME_INCLUDE_DIR" not in os.environ and unpacked.is_dir():
        os.environ["ONNXRUNTIME_INCLUDE_DIR"] = str(unpacked)
    # As the detrkit program runs: freed feature maps are reused, not faulted in again.
    keep_freed_memory()
    threads = torch.get_num_threads()
    import onnxruntime
    import openvino

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino "
        f"{openvino.__version__}, {threads} threads, input {args.size[0]}x{args.size[1]}"
        + (", OpenVINO compiled for that shape" if args.openvino_static else "")
    )
    for name in args.models:
        compare(name, args, threads)


if __name__ == "__main__":
    main()
