"""``detrkit convert``: any checkpoint detrkit reads, written in detrkit's own format or as a
transformers directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from detrkit.checkpoints import load, save
from detrkit.checkpoints.huggingface import (
    TRANSFORMERS_CLASSES,
    TRANSFORMERS_FILES,
    save_transformers,
)
from detrkit.checkpoints.native import CONFIG_FILE, WEIGHTS_FILE
from detrkit.cli.inference import add_image_size_options, image_sizes, recorded_resize
from detrkit.files import existing_results

TARGETS = ("detrkit", "transformers")


def cmd_convert(args: argparse.Namespace) -> int:
    """Converts a checkpoint to detrkit's format or to a transformers directory."""
    fmt, *rest = args.to
    if fmt not in TARGETS or len(rest) > 1:
        raise ValueError(f"--to takes {' or '.join(TARGETS)} and optionally OUT, got {args.to}")
    given = {path for path in (args.out, args.out_flag, *rest) if path is not None}
    if len(given) > 1:
        raise ValueError(f"several output directories: {', '.join(sorted(given))}")
    target = given.pop() if given else None
    if target is None:
        raise ValueError("convert: name the output directory (OUT or --out)")
    out = Path(target)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if fmt == "transformers":
        # Checked before loading: an earlier result is never replaced unasked.
        existing_results(
            [out / name for name in TRANSFORMERS_FILES], f"--out {out}", args.overwrite
        )
        resize = recorded_resize(args, "preprocessor_config.json records a resize")
        if resize[0] is None:
            raise ValueError(
                "--short-side 0: transformers' image processor always resizes; give a short side"
            )
        model = load(args.weights)
        save_transformers(model, out, overwrite=args.overwrite, resize=resize)
        print(
            f"wrote {out} ({TRANSFORMERS_CLASSES[model.config.model_type]}, "
            f"{model.config.num_classes} classes)"
        )
        return 0
    if image_sizes(args):
        raise ValueError("--short-side and --max-size are for --to transformers")
    existing_results([out / CONFIG_FILE, out / WEIGHTS_FILE], f"--out {out}", args.overwrite)
    model = load(args.weights)
    directory = save(model, out)
    print(f"wrote {directory} ({model.config.model_type}, {model.config.num_classes} classes)")
    return 0


def add_convert_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Adds ``convert`` to the ``detrkit`` subcommands."""
    parser = commands.add_parser(
        "convert",
        help="convert a checkpoint to detrkit's format or to a transformers directory",
        description="Convert any checkpoint detrkit reads. --to detrkit (the default) writes "
        "detrkit's own directory; --to transformers writes config.json, model.safetensors and "
        "preprocessor_config.json that DetrForObjectDetection, DetrForSegmentation or "
        "DeformableDetrForObjectDetection.from_pretrained load (docs/deployment.md says "
        "which outputs are equal).",
    )
    parser.add_argument(
        "weights",
        help="an official DETR .pth, a Hugging Face save_pretrained directory, a detrkit "
        "directory or a training checkpoint",
    )
    parser.add_argument("out", nargs="?", help="the output directory (or --out)")
    parser.add_argument("--out", dest="out_flag", help="the output directory")
    # "--to transformers OUT" as the issue spells it: OUT may follow the format (argparse
    # would not take a positional after an option's value).
    parser.add_argument(
        "--to",
        nargs="+",
        default=["detrkit"],
        metavar="FORMAT [OUT]",
        help=f"the format to write, {' or '.join(TARGETS)} (default: detrkit), optionally "
        "followed by the output directory",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a model written to the directory before"
    )
    # transformers' processor resizes as detrkit's Detector does: by default the training run's.
    add_image_size_options(parser)
    parser.set_defaults(run=cmd_convert)
