"""``detrkit export``: a checkpoint to ONNX or a torch.export program, verified before it is kept."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from detrkit.checkpoints import load, require_finite_weights
from detrkit.cli.arguments import positive_int
from detrkit.cli.inference import add_image_size_options, recorded_resize
from detrkit.deploy import (
    DEFAULT_OPSET,
    FORMATS,
    MIN_OPSET,
    ExportError,
    ExportResult,
    check_attention_op,
    check_writable,
    export,
    newest_opset,
)
from detrkit.deploy.sizes import check_export_size
from detrkit.deploy.to_onnx import check_opset
from detrkit.files import WriteError
from detrkit.ops import ATTENTION_OPS

# The file suffix of each format's files; the other suffix with --format is a mistake.
SUFFIXES = {"onnx": ".onnx", "torch": ".pt2"}


def cmd_export(args: argparse.Namespace) -> int:
    """Loads the checkpoint, exports it and reports how far the export is from PyTorch."""
    out = Path(args.out)
    format_name = args.format or ("torch" if out.suffix == ".pt2" else "onnx")
    size = tuple(args.size)
    try:
        # Everything the options alone decide is checked before the checkpoint is read and
        # before the export's tracing (tens of seconds) starts.
        check_out(out, format_name, args.format is not None, args.overwrite)
        if format_name == "onnx":
            check_opset(args.opset, "--opset")
        # Load errors (CheckpointError, FileNotFoundError) are reported by main, naming the file.
        model = load(args.weights)
        require_finite_weights(model, f"--weights {args.weights}")
        check_attention_op(
            args.attention_op,
            format_name,
            model.config,
            not args.no_verify,
            "--attention-op",
            "--no-verify",
        )
        check_export_size(model, size, f"--size {size[0]} {size[1]}")
        resize = recorded_resize(args, "the export records a resize")
        result = export(
            model,
            out,
            format_name,
            opset=args.opset,
            attention_op=args.attention_op,
            with_postprocess=args.with_postprocess,
            with_mask=not args.no_mask,
            size=size,
            resize=resize,
            tolerance=args.tolerance,
            verify=not args.no_verify,
            overwrite=args.overwrite,
        )
    # ValueError: non-finite weights or outputs, a bad opset; WriteError: a full disk.
    except (ExportError, ModuleNotFoundError, ValueError, WriteError) as error:
        # A WriteError's message is its strerror: str() would put "[Errno 28]" before it.
        message = error.strerror if isinstance(error, WriteError) else str(error)
        print(f"detrkit: error: {message}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0


def check_out(out: Path, format_name: str, format_given: bool, overwrite: bool) -> None:
    """Raises ExportError, naming --out, for a file that exists (without --overwrite), a path
    that cannot be written, or a suffix of the other format than --format's."""
    other = next(f for f in FORMATS if f != format_name)
    if format_given and out.suffix == SUFFIXES[other]:
        raise ExportError(
            f"--format {format_name} writes a {SUFFIXES[format_name]} file, but --out {out} "
            f"ends in {out.suffix} (the {other} format's suffix); name the file "
            f"{out.with_suffix(SUFFIXES[format_name]).name} or leave out --format"
        )
    if os.path.lexists(out) and not (out.is_dir() and not out.is_symlink()) and not overwrite:
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it")
    try:
        check_writable(out, overwrite=True)
    except ExportError as error:
        raise ExportError(f"--out {error}") from None


def describe(result: ExportResult) -> str:
    """Two lines: what was written, and the checks against PyTorch."""
    meta = result.metadata
    lines = [f"wrote {result.path} ({result.format}, {meta['preset']}, inputs {meta['inputs']})"]
    if result.verified_shapes:
        runtime = "ONNX Runtime" if result.format == "onnx" else "torch.export.load"
        checks = " and ".join(
            f"a batch of {batch} at {height}x{width}"
            for batch, height, width in result.verified_shapes
        )
        figures = ", ".join(f"{name} {value:.1e}" for name, value in result.differences.items())
        lines.append(f"verified with {runtime} on {checks} against PyTorch: max |diff| {figures}")
    return "\n".join(lines)


def _tolerance(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def add_export_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Adds ``export`` to the ``detrkit`` subcommands."""
    parser = commands.add_parser(
        "export",
        help="export a model to ONNX or torch.export, checked against PyTorch",
        description="Export a checkpoint to ONNX (ONNX Runtime, TensorRT, OpenVINO, ...) or to a "
        "torch.export program. The file is run on one image at the export's size and on a "
        "batch of 3 at a larger size, and compared with PyTorch before it is kept; a "
        "difference above the tolerance is an error.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="any checkpoint detrkit.load reads: an official .pth, a Hugging Face directory, "
        "a detrkit directory or a training checkpoint",
    )
    parser.add_argument(
        "--out", required=True, help="the file to write (.onnx or .pt2); see --overwrite"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the file at --out if there is one"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="onnx or torch (default: torch for a .pt2 file, else onnx)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} to {newest_opset()} (default {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "--attention-op",
        choices=ATTENTION_OPS,
        default="gridsample",
        help="how an ONNX export writes Deformable DETR's attention: gridsample (ONNX "
        "GridSample per level, for any runtime; default) or detrkit (one "
        "ai.detrkit::MultiScaleDeformableAttention node, which ONNX Runtime and OpenVINO run 1.6x "
        "to 2.7x faster with detrkit's library loaded, see docs/deployment.md)",
    )
    parser.add_argument(
        "--with-postprocess",
        action="store_true",
        help="also take orig_sizes [B, 2] and return scores, labels and absolute xyxy boxes "
        "(and a panoptic model's pred_masks, per detection)",
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
        help="image size to trace with (default 800 1066); the export takes other sizes. Every "
        "feature map must be at least 2x2 at this size: each side at least 33 for DETR (17 "
        "with DC5) and 65 for four-level Deformable DETR (its stride-64 level); two-stage "
        "also needs as many encoder positions as queries (113 113 for 300)",
    )
    add_image_size_options(parser)
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1e-4,
        help="largest absolute difference from PyTorch allowed (default 1e-4)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="write the file without running it against PyTorch (for an --attention-op detrkit "
        "export where ONNX Runtime's headers are missing, say)",
    )
    parser.set_defaults(run=cmd_export)
