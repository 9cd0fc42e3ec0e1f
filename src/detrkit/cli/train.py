"""``detrkit train`` and ``detrkit eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from detrkit.cli.arguments import model_option, non_negative_int
from detrkit.engine.config import AMP_CHOICES, DIGITS_DATA, TrainConfig
from detrkit.fast import PRECISIONS

_TYPES = {"int": int, "float": float, "str": str}


def _option_type(annotation: str):
    for name, kind in _TYPES.items():
        if annotation.startswith(name):
            return kind
    return None


def add_precision_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--precision``: run a copy of the model prepared for inference in that precision."""
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default=default,
        help="run the model prepared for inference (batch norm folded, channels-last) in this "
        "precision: fp32 gives the same results, bf16 is faster on CPUs with AMX or AVX-512 "
        "BF16 and on GPUs, fp16 needs a GPU"
        + (f" (default {default})" if default else " (default: the model as loaded)"),
    )


def add_train_commands(commands) -> None:
    """Adds ``train`` and ``eval`` to the ``detrkit`` subcommands."""
    train = commands.add_parser(
        "train",
        help="train a model",
        description="Train a model. Every TrainConfig field is an option; unset ones come from "
        "--config or the model's original recipe.",
    )
    train.add_argument(
        "--config", help="a config.json written by an earlier run; options given override it"
    )
    train.add_argument(
        "--resume",
        help="a run directory to continue where it stopped, or 'auto' to continue --output if "
        "it holds a checkpoint (else start there)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in --output (its checkpoint, config, metrics, pictures)",
    )
    train.add_argument(
        "--model-option",
        action="append",
        type=model_option,
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the model preset (e.g. num_queries=50)",
    )
    train.add_argument("--num-classes", type=int, help="shorthand for --model-option num_classes=N")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_options":
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata["help"]
        if field.type == "bool":
            default = "on" if field.default else "off"
            train.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default {default})",
            )
        else:
            shown = "" if field.default is None else f" (default {field.default})"
            train.add_argument(
                flag, type=_option_type(field.type), default=None, help=help_text + shown
            )
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("eval", help="COCO AP of a checkpoint on a validation set")
    evaluate.add_argument("--weights", required=True, help="anything detrkit.load reads")
    evaluate.add_argument(
        "--data",
        required=True,
        help="'digits' (the built-in validation split), coco:VAL_IMAGES,VAL_JSON, or the val "
        "split of voc:ROOT or yolo:DATA_YAML",
    )
    evaluate.add_argument("--out", type=Path, help="write metrics.json and results.json here")
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace metrics.json and results.json in --out"
    )
    # Data settings default to the training run's when --weights is a checkpoint of detrkit
    # train (evaluate_run.training_data_settings), else to evaluate_run.EVAL_DEFAULTS.
    from_run = " (default: the training run's for a detrkit train checkpoint, else {})"
    evaluate.add_argument("--batch-size", type=int, help="images per batch" + from_run.format(2))
    evaluate.add_argument(
        "--image-scale", type=float, help="image size factor" + from_run.format(1.0)
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument(
        "--amp",
        default="none",
        choices=AMP_CHOICES,
        help="autocast: bf16, fp16 (GPU), or auto (bf16 where the device computes it in hardware)",
    )
    add_precision_option(evaluate, default=None)
    evaluate.add_argument(
        "--workers", type=non_negative_int, default=0, help="data-loading processes"
    )
    evaluate.add_argument("--digits-val", type=int, help="digits images" + from_run.format(200))
    evaluate.add_argument("--seed", type=int, help="digits split seed" + from_run.format(42))
    evaluate.add_argument(
        "--label-mapping",
        choices=["contiguous", "coco"],
        help="class numbering" + from_run.format("contiguous"),
    )
    evaluate.add_argument(
        "--group-by-aspect",
        action=argparse.BooleanOptionalAction,
        help="batch images of similar aspect ratio together" + from_run.format("on"),
    )
    evaluate.set_defaults(run=run_eval)


def _options_given(args: argparse.Namespace) -> dict[str, object]:
    """The TrainConfig fields (model_options aside) given on the command line, with values."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "model_options" and getattr(args, f.name) is not None
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config (if any), then every option given on the command line on top."""
    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    given = _options_given(args)
    options = dict(config.model_options)
    options.update(dict(args.model_option))
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    return dataclasses.replace(config, **given, model_options=options)


def given_fields(args: argparse.Namespace) -> set[str] | None:
    """The TrainConfig fields the command line set (a resume compares only those with the
    run's); None with --config, whose file may set any."""
    if args.config:
        return None
    names = set(_options_given(args))
    if args.model_option or args.num_classes is not None:
        names.add("model_options")
    return names


def run_train(args: argparse.Namespace) -> int:
    from detrkit.engine.train import TrainingError, train

    try:
        train(
            config_from_args(args),
            resume=args.resume,
            given=given_fields(args),
            overwrite=args.overwrite,
        )
    except TrainingError as error:
        print(f"detrkit: error: {error}")
        return 1
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from detrkit.checkpoints.load import check_device
    from detrkit.engine.evaluate import amp_auto_note
    from detrkit.engine.evaluate_run import (
        EVAL_DEFAULTS,
        evaluate_checkpoint,
        training_data_settings,
    )

    from_run = training_data_settings(args.weights)
    given = {name: getattr(args, name) for name in EVAL_DEFAULTS}
    settings = {**EVAL_DEFAULTS, **from_run}
    settings.update({name: value for name, value in given.items() if value is not None})
    taken = {name: from_run[name] for name in from_run if given[name] is None}
    if args.data not in DIGITS_DATA:  # the digits split's settings do not apply
        taken = {k: v for k, v in taken.items() if k not in ("digits_val", "seed")}
    if taken:
        listed = ", ".join(f"{name}={value}" for name, value in taken.items())
        print(f"detrkit eval: the training run's {listed}", file=sys.stderr)
    if args.amp == "auto" and args.precision is None:
        print(f"detrkit eval: {amp_auto_note(check_device(args.device))}", file=sys.stderr)
    numbers = evaluate_checkpoint(
        args.weights,
        args.data,
        args.out,
        settings["batch_size"],
        settings["image_scale"],
        args.device,
        args.amp,
        args.workers,
        settings["digits_val"],
        settings["seed"],
        settings["label_mapping"],
        precision=args.precision,
        overwrite=args.overwrite,
        group_by_aspect=settings["group_by_aspect"],
    )
    print(json.dumps(numbers, indent=2))
    return 0
