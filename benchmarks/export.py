"""Latency of exported models on ONNX Runtime against detrkit's PyTorch paths and transformers.

    python benchmarks/export.py [--models detr deformable_detr] [--repeats 3] [--size 800 1066]

For each model a randomly initialised transformers model is saved with save_pretrained and loaded
with detrkit.load (the same weights, as in end_to_end.py) and exported to ONNX with
detrkit.export, traced at the benchmark size (the file takes any size). Then, in one run, on one
normalised image, batch 1, median of ``--repeats`` after a warm-up: transformers fp32, detrkit
fp32, detrkit under bf16 autocast, and the ONNX file on ONNX Runtime's CPU provider with as many
threads as torch uses. Prints the times, each one's ratio to ONNX Runtime's, and how far ONNX
Runtime's logits and boxes are from detrkit fp32's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from end_to_end import hf_model, median_time

import detrkit
from detrkit.deploy import ExportedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["detr", "deformable_detr"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(1, 3, *args.size)
    mask = torch.zeros(1, *args.size, dtype=torch.bool)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, input {tuple(images.shape)}")
    header = ("model", "transformers", "detrkit fp32", "detrkit bf16", "onnxruntime", "export")
    print(f"{header[0]:16s}" + "".join(f"{h:>15s}" for h in header[1:]) + f"{'max |diff|':>12s}")
    for name in args.models:
        compare(name, images, mask, args.repeats, threads)


def compare(name: str, images: torch.Tensor, mask: torch.Tensor, repeats: int, threads: int):
    """Times one model on every path and prints a row of times and a row of ratios."""
    hf = hf_model(name)
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = detrkit.load(directory)
        onnx_path = Path(directory) / f"{name}.onnx"
        start = time.perf_counter()
        # verify=False: the check below compares on the benchmark image itself; export's own
        # check would run a batch of 3 larger images through both, minutes on a small CPU.
        detrkit.export(ours, onnx_path, size=tuple(images.shape[-2:]), verify=False)
        export_time = time.perf_counter() - start
        exported = ExportedModel(onnx_path, threads=threads)

    pixel_mask = (~mask).long()
    with torch.inference_mode():
        expected = ours(images, mask)
        actual = exported(images=images, mask=mask)
        diff = max(
            (actual[key] - expected[key]).abs().max().item()
            for key in ("pred_logits", "pred_boxes")
        )
        times = {
            "transformers": median_time(
                lambda: hf(pixel_values=images, pixel_mask=pixel_mask), repeats
            ),
            "detrkit fp32": median_time(lambda: ours(images, mask), repeats),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            times["detrkit bf16"] = median_time(lambda: ours(images, mask), repeats)
    times["onnxruntime"] = median_time(lambda: exported(images=images, mask=mask), repeats)

    cells = "".join(f"{value:14.3f}s" for value in times.values())
    print(f"{name:16s}{cells}{export_time:14.0f}s{diff:12.1e}")
    ratios = "".join(f"{value / times['onnxruntime']:14.2f}x" for value in times.values())
    print(f"{'  / onnxruntime':16s}{ratios}")


if __name__ == "__main__":
    main()
