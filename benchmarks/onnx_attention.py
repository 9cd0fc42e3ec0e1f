"""Deformable attention alone as ONNX: the export's GridSample form against the gathers, on ONNX
Runtime and OpenVINO, at the encoder's size for an 800x1066 image.

    python benchmarks/onnx_attention.py [--repeats 5] [--threads N]

Each implementation is exported once with dynamic batch, positions and queries (traced on small
inputs, as a model's export is), then run on levels 100x134, 50x67, 25x34 and 13x17 (M=8, D=32,
P=4, every position a query, batch 1). The locations lie around each query's own position, a
few pixels off, some off the map, as a trained encoder's do. Rounds are interleaved; prints the
median seconds and the largest difference from the reference. OpenVINO is skipped where it is
not installed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from detrkit.ops import ms_deform_attn, ms_deform_attn_reference, onnx_translation_table

NAMES = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
ENCODER_LEVELS = [(100, 134), (50, 67), (25, 34), (13, 17)]
HEADS, CHANNELS, POINTS = 8, 32, 4


def encoder_inputs(levels, batch: int = 1, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    areas = shapes.prod(1)
    starts = areas.cumsum(0) - areas
    length = int(areas.sum())
    # Each query's reference point is its own pixel's centre on every level.
    centres = torch.cat(
        [
            torch.stack(
                torch.meshgrid(
                    (torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"
                ),
                -1,
            ).reshape(-1, 2)
            for h, w in levels
        ]
    )
    pixel = 1 / shapes.flip(-1).float()  # [L, 2] (1/W, 1/H)
    offsets = torch.randn(batch, length, HEADS, len(levels), POINTS, 2, generator=generator)
    locations = centres[None, :, None, None, None] + 2 * offsets * pixel[:, None]
    weights = torch.rand(batch, length, HEADS, len(levels), POINTS, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    value = torch.randn(batch, length, HEADS, CHANNELS, generator=generator)
    return value, shapes, starts, locations, weights


class Attention(torch.nn.Module):
    def __init__(self, implementation: str):
        super().__init__()
        self.implementation = implementation

    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights,
            implementation=self.implementation,
        )


def export(implementation: str, path: str) -> None:
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    queries = torch.export.Dim("queries")
    small = encoder_inputs([(12, 14), (6, 7), (3, 4), (2, 2)], batch=2)
    program = torch.onnx.export(
        Attention(implementation),
        small,
        dynamo=True,
        input_names=NAMES,
        dynamic_shapes=(
            {0: batch, 1: length},
            None,
            None,
            {0: batch, 1: queries},
            {0: batch, 1: queries},
        ),
        custom_translation_table=onnx_translation_table(),
        optimize=True,
        verbose=False,
    )
    program.save(path)


def runners(path: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    yield "onnxruntime", lambda feeds: session.run(None, feeds)[0]
    try:
        import openvino
    except ModuleNotFoundError:
        return
    core = openvino.Core()
    properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    request = core.compile_model(core.read_model(path), "CPU", properties).create_infer_request()
    yield "openvino f32", lambda feeds: next(iter(request.infer(feeds).values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    import tempfile

    inputs = encoder_inputs(ENCODER_LEVELS)
    feeds = {name: tensor.numpy() for name, tensor in zip(NAMES, inputs)}
    expected = ms_deform_attn_reference(*inputs).numpy()
    runs, differences = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        for implementation, label in (("onnx", "GridSample"), ("portable", "gathers")):
            path = f"{directory}/{implementation}.onnx"
            export(implementation, path)
            for runtime, run in runners(path, args.threads):
                key = f"{runtime}, {label}"
                runs[key] = run
                differences[key] = float(np.abs(run(feeds) - expected).max())  # and warm-up
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run(feeds)
            times[key].append(time.perf_counter() - start)
    print(f"{args.threads} threads, levels {ENCODER_LEVELS}, {inputs[3].shape[1]} queries")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"  {key:28s}{median:8.3f} s   max |diff| {differences[key]:.1e}")


if __name__ == "__main__":
    main()
