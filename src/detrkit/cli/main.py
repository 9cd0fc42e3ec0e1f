"""The ``detrkit`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from detrkit.checkpoints import CheckpointError, load
from detrkit.cli.allocator import keep_freed_memory
from detrkit.cli.convert import add_convert_commands
from detrkit.cli.data import add_data_commands
from detrkit.cli.explore import add_explore_commands
from detrkit.cli.export import add_export_commands
from detrkit.cli.inference import add_inference_commands
from detrkit.cli.train import add_train_commands
from detrkit.models import PRESETS
from detrkit.version import __version__


def cmd_models(args: argparse.Namespace) -> int:
    """Lists the model presets."""
    for name, config in sorted(PRESETS.items()):
        variant = [
            flag for flag in ("with_box_refine", "two_stage") if getattr(config, flag, False)
        ]
        levels = getattr(config, "num_feature_levels", None)
        print(
            f"{name:30s} backbone={config.backbone} dilation={config.dilation} "
            f"queries={config.num_queries} layers={config.enc_layers}+{config.dec_layers}"
            + (f" levels={levels}" if levels else "")
            + "".join(f" {flag}" for flag in variant)
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Loads a checkpoint and prints its model config and size."""
    model = load(args.weights)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {
        "weights": str(args.weights),
        "config": model.config.to_dict(),
        "parameters": parameters,
        "trainable_parameters": trainable,
    }
    print(json.dumps(report, indent=2))
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the option and the problem, like
    every other error of the program, and point at the command's --help instead of printing
    argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"detrkit: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="detrkit",
        description="DETR and Deformable DETR: train and evaluate models, run them on images "
        "(predict), see inside them (explore, explain, trace), load, convert, inspect and export "
        "checkpoints, check datasets.",
    )
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    # Subcommands' parsers (and theirs) are made of the parser's class.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list the model presets")
    models.set_defaults(run=cmd_models)

    weights_help = (
        "an official DETR .pth, a Hugging Face save_pretrained directory or a detrkit directory"
    )
    inspect = commands.add_parser("inspect", help="print a checkpoint's model config")
    inspect.add_argument("weights", help=weights_help)
    inspect.set_defaults(run=cmd_inspect)

    add_convert_commands(commands)
    add_train_commands(commands)
    add_data_commands(commands)
    add_inference_commands(commands)
    add_explore_commands(commands)
    add_export_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    # Bad input and files that cannot be read or written (a full disk among them, WriteError):
    # one line naming the culprit, no traceback.
    except (CheckpointError, ValueError, OSError) as error:
        print(f"detrkit: error: {error}", file=sys.stderr)
        return 2


def run() -> int:
    """The ``detrkit`` program: :func:`main` in a process whose allocator keeps freed memory for
    reuse (see :mod:`detrkit.cli.allocator`)."""
    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
