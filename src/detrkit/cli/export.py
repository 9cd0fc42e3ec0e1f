"""``detrkit export``: a checkpoint to ONNX or a torch.export program, verified before it is kept."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detrkit.checkpoints import load
from detrkit.cli.inference import positive_float, positive_int
from detrkit.deploy import DEFAULT_OPSET, FORMATS, ExportError, ExportResult, export


def cmd_export(args: argparse.Namespace) -> int:
    """Loads the checkpoint, exports it and reports how far the export is from PyTorch."""
    model = load(args.weights)  # CheckpointError: reported by main with exit code 2
    out = Path(args.out)
    format_name = args.format or ("torch" if out.suffix == ".pt2" else "onnx")
    try:
        result = export(
            model,
            out,
            format_name,
            opset=args.opset,
            with_postprocess=args.with_postprocess,
            with_mask=not args.no_mask,
            size=tuple(args.size),
            tolerance=args.tolerance,
        )
    except (ExportError, ModuleNotFoundError) as error:
        print(f"detrkit: error: {error}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0


def describe(result: ExportResult) -> str:
    """Two lines: what was written, and the check against PyTorch."""
    meta = result.metadata
    lines = [f"wrote {result.path} ({result.format}, {meta['preset']}, inputs {meta['inputs']})"]
    if result.verified_shape:
        runtime = "ONNX Runtime" if result.format == "onnx" else "torch.export.load"
        batch, height, width = result.verified_shape
        figures = ", ".join(f"{name} {value:.1e}" for name, value in result.differences.items())
        lines.append(
            f"verified with {runtime} on a batch of {batch} at {height}x{width} against PyTorch: "
            f"max |diff| {figures}"
        )
    return "\n".join(lines)


def add_export_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Adds ``export`` to the ``detrkit`` subcommands."""
    parser = commands.add_parser(
        "export",
        help="export a model to ONNX or torch.export, checked against PyTorch",
        description="Export a checkpoint to ONNX (ONNX Runtime, TensorRT, OpenVINO, ...) or to a "
        "torch.export program. The file is run on a batch and an image size other than the "
        "export's and compared with PyTorch before it is kept; a difference above the "
        "tolerance is an error.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="any checkpoint detrkit.load reads: an official .pth, a Hugging Face directory, "
        "a detrkit directory or a training checkpoint",
    )
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt2)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="onnx or torch (default: torch for a .pt2 file, else onnx)",
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--with-postprocess",
        action="store_true",
        help="also take orig_sizes [B, 2] and return scores, labels and absolute xyxy boxes",
    )
    parser.add_argument(
        "--no-mask", action="store_true", help="no padding mask input (images are not padded)"
    )
    parser.add_argument(
        "--size",
        type=positive_int,
        nargs=2,
        default=[800, 1066],
        metavar=("H", "W"),
        help="image size to trace with (default 800 1066); the export takes any size",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=1e-4,
        help="largest absolute difference from PyTorch allowed (default 1e-4)",
    )
    parser.set_defaults(run=cmd_export)
