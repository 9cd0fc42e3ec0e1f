"""The ``detrkit data`` commands: check a COCO-format dataset, write the built-in digits dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from detrkit.cli.arguments import non_negative_int
from detrkit.data.check import check_dataset, check_panoptic
from detrkit.data.digits import write_digits_coco


def cmd_data_check(args: argparse.Namespace) -> int:
    """Prints the dataset report; exits non-zero only when the dataset is unusable: when
    training or evaluation would refuse it (the loader applies the same rules)."""
    if args.annotations is None and args.panoptic is None:
        raise ValueError(
            "data check: give an instances JSON (ANNOTATIONS), a panoptic one (--panoptic) or both"
        )
    if args.panoptic_dir is not None and args.panoptic is None:
        raise ValueError("data check: --panoptic-dir is the folder of --panoptic's PNGs; give both")
    reports = []
    if args.annotations is not None:
        reports.append(
            check_dataset(
                args.images, args.annotations, decode_images=not args.no_decode, masks=args.masks
            )
        )
    if args.panoptic is not None:
        reports.append(
            check_panoptic(
                args.images, args.panoptic, args.panoptic_dir, decode_images=not args.no_decode
            )
        )
    print("\n\n".join(report.format() for report in reports))
    return max(report.exit_code for report in reports)


def cmd_data_make_digits(args: argparse.Namespace) -> int:
    """Writes the digits detection dataset in COCO format."""
    try:
        written = write_digits_coco(
            args.out,
            args.train,
            args.val,
            seed=args.seed,
            overwrite=args.overwrite,
            masks=args.masks,
        )
    except FileExistsError:
        raise  # named by main, with --overwrite
    except OSError as error:
        print(f"detrkit: error: cannot write the dataset: {error}", file=sys.stderr)
        return 2
    for split, count in (("train", args.train), ("val", args.val)):
        print(f"wrote {count} {split} images to {args.out}/{split}, annotations {written[split]}")
        if args.masks:
            print(f"  panoptic annotations {written['panoptic_' + split]} (PNGs beside it)")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds the ``data`` command group (``check``, ``make-digits``) to a subparsers object."""
    data = subparsers.add_parser("data", help="check datasets, make the built-in digits dataset")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    check = commands.add_parser(
        "check",
        help="report the problems of a COCO-format dataset: errors where training or evaluation "
        "would refuse it (exit 1), warnings for what they leave out or clip",
    )
    check.add_argument("images", help="directory of the image files")
    check.add_argument(
        "annotations",
        nargs="?",
        help="COCO instances JSON file (optional with --panoptic: both sets are checked)",
    )
    check.add_argument(
        "--masks",
        action="store_true",
        help="check the instances as mask training reads them: every object needs a "
        "segmentation (polygons or RLE) that decodes at its image's size",
    )
    check.add_argument(
        "--panoptic",
        metavar="PANOPTIC_JSON",
        help="also (or only) check a COCO panoptic set of these images: its JSON and PNGs",
    )
    check.add_argument(
        "--panoptic-dir",
        metavar="DIR",
        help="folder of the panoptic PNGs (default: PANOPTIC_JSON without .json, COCO's layout)",
    )
    check.add_argument(
        "--no-decode",
        action="store_true",
        help="only read image headers (faster; truncated images go unnoticed)",
    )
    check.set_defaults(run=cmd_data_check)

    digits = commands.add_parser(
        "make-digits", help="write the handwritten-digits detection dataset in COCO format"
    )
    digits.add_argument("out", help="output directory")
    digits.add_argument(
        "--train", type=non_negative_int, required=True, help="number of training images"
    )
    digits.add_argument(
        "--val", type=non_negative_int, required=True, help="number of validation images"
    )
    digits.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    digits.add_argument(
        "--overwrite", action="store_true", help="replace a digits dataset written there before"
    )
    digits.add_argument(
        "--masks",
        action="store_true",
        help="add each digit's exact mask (RLE) and write the panoptic version "
        "(annotations/panoptic_{train,val}.json and PNGs; the canvas as stuff)",
    )
    digits.set_defaults(run=cmd_data_make_digits)
