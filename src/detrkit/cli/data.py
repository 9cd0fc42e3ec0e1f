"""The ``detrkit data`` commands: check a dataset (COCO, Pascal VOC, YOLO), convert VOC and YOLO
to COCO files, write the built-in digits dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from detrkit.cli.arguments import non_negative_int
from detrkit.data.check import check_dataset, check_format, check_panoptic
from detrkit.data.digits import write_digits_coco
from detrkit.data.formats import convert_to_coco, format_path, is_format_data


def cmd_data_check(args: argparse.Namespace) -> int:
    """Prints the dataset report; exits non-zero only when the dataset is unusable: when
    training or evaluation would refuse it (the loader applies the same rules)."""
    if is_format_data(args.images):
        if args.annotations is not None or args.panoptic is not None:
            raise ValueError(
                f"data check {args.images}: a VOC or YOLO dataset is checked alone (its "
                "annotations are its own files); give no ANNOTATIONS or --panoptic"
            )
        format_path(args.images)  # an empty path: one line saying what is expected
        reports = check_format(args.images, decode_images=not args.no_decode, masks=args.masks)
        print("\n\n".join(report.format() for report in reports))
        return max(report.exit_code for report in reports)
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


def cmd_data_convert(args: argparse.Namespace) -> int:
    """Writes a VOC or YOLO dataset's splits as COCO instances files, the images left in
    place."""
    data = f"{args.source_format}:{args.source}"
    format_path(data)  # an empty path: one line saying what is expected
    written = convert_to_coco(data, args.out, overwrite=args.overwrite)
    for split in ("train", "val"):
        print(f"wrote {written[split]} (file names relative to {written['images_' + split]})")
    parts = [written[name] for name in ("images_train", "train", "images_val", "val")]
    print(f"train on it with --data coco:{','.join(str(part) for part in parts)}")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Adds the ``data`` command group (``check``, ``make-digits``) to a subparsers object."""
    data = subparsers.add_parser("data", help="check datasets, make the built-in digits dataset")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    check = commands.add_parser(
        "check",
        help="report the problems of a dataset (COCO, voc:ROOT, yolo:DATA_YAML): errors where "
        "training or evaluation would refuse it (exit 1), warnings for what they leave out or clip",
    )
    check.add_argument(
        "images",
        help="directory of the image files; or voc:ROOT (a Pascal VOC folder) or "
        "yolo:DATA_YAML (a YOLO dataset), whose train and val splits are checked",
    )
    check.add_argument(
        "annotations",
        nargs="?",
        help="COCO instances JSON file (optional with --panoptic: both sets are checked; none "
        "for voc: and yolo:)",
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

    convert = commands.add_parser(
        "convert",
        help="write a Pascal VOC or YOLO dataset's train and val splits as COCO instances "
        "files (OUT/annotations/instances_{train,val}.json), the images left in place",
    )
    convert.add_argument(
        "--from",
        dest="source_format",
        choices=("voc", "yolo"),
        required=True,
        help="the source's format",
    )
    convert.add_argument("source", help="the VOC folder (ROOT) or the YOLO data.yaml")
    convert.add_argument(
        "--to", choices=("coco",), required=True, help="the format written (COCO instances)"
    )
    convert.add_argument("out", help="output directory")
    convert.add_argument(
        "--overwrite", action="store_true", help="replace COCO files written there before"
    )
    convert.set_defaults(run=cmd_data_convert)

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
