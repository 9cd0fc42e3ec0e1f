"""``detrkit predict`` and ``detrkit explain``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detrkit.cli.arguments import non_negative_int, pixel, positive_int, threshold
from detrkit.cli.train import add_precision_option
from detrkit.data.images import scaled_image_size
from detrkit.inference.detector import MAX_SIZE, SHORT_SIDE, training_image_scale
from detrkit.models.postprocess import PANOPTIC_THRESHOLD


def make_detector(args: argparse.Namespace):
    """The Detector the ``--weights``, ``--threshold``, ``--device`` and size options describe."""
    from detrkit.inference import Detector

    size, max_size = recorded_resize(args, "resizing")
    return Detector.from_checkpoint(
        args.weights,
        device=args.device,
        threshold=args.threshold,
        precision=args.precision,
        size=size,
        max_size=max_size,
    )


def check_output_directory(out: Path) -> None:
    """Raises ValueError when ``--out`` cannot be a directory to write into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")


def cmd_predict(args: argparse.Namespace) -> int:
    """Detections on files, folders and glob patterns; 1 when some inputs were skipped."""
    from detrkit.inference.detector import no_masks_message
    from detrkit.inference.predict import category_ids_note, predict_files

    check_output_directory(args.out)
    detector = make_detector(args)
    if args.panoptic and not detector.has_masks:
        raise ValueError(f"--weights {args.weights}: {no_masks_message(detector.config)}")
    try:
        report = predict_files(
            detector,
            args.inputs,
            args.out,
            args.batch_size,
            overwrite=args.overwrite,
            panoptic=args.panoptic,
            panoptic_threshold=args.panoptic_threshold,
        )
    except FileExistsError:
        raise
    except OSError as error:  # unreadable inputs are skipped inside; this is about writing
        raise ValueError(f"--out {args.out}: cannot write the results ({error})") from None
    print(
        f"{len(report.pictures)} images, {report.detections} detections at threshold "
        f"{args.threshold}: pictures in {args.out}, results in {report.results_file} "
        f"({category_ids_note(detector)}), image ids in {report.images_file}"
    )
    if report.panoptic_file is not None:
        print(
            f"{report.segments} panoptic segments (queries above {args.panoptic_threshold}): "
            f"{report.panoptic_file} and its PNGs in {report.panoptic_file.with_suffix('')}"
        )
    if report.skipped:
        print(f"detrkit: skipped {len(report.skipped)} inputs (listed above)", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Figures of the model's internals on each image (in a folder per image when several)."""
    from detrkit.data import ImageReadError
    from detrkit.inference.explain import explain, nothing_found_note
    from detrkit.inference.predict import expand_inputs, output_names

    check_output_directory(args.out)
    paths, problems = expand_inputs(args.images)
    if problems:
        raise ValueError("; ".join(f"{name}: {why}" for name, why in problems))
    detector = make_detector(args)
    folders = (
        [args.out] if len(paths) == 1 else [args.out / Path(n).stem for n in output_names(paths)]
    )
    for path, folder in zip(paths, folders):
        try:
            objects, written, highest = explain(
                detector, path, folder, args.pixel, args.max_objects, overwrite=args.overwrite
            )
        except ImageReadError as error:
            raise ValueError(str(error)) from None
        except FileExistsError:
            raise
        except OSError as error:
            raise ValueError(f"--out {folder}: cannot write the figures ({error})") from None
        if len(paths) > 1:
            print(f"{path}:")
        if not objects:
            print(
                f"detrkit: nothing in {path} {nothing_found_note(args.threshold, highest)}; only "
                "the encoder figures were drawn (a lower --threshold explains weaker detections)",
                file=sys.stderr,
            )
        for obj in objects:
            print(f"object #{obj.number}: {obj.name} {obj.score:.2f} (query {obj.query})")
        for written_path in written:
            print(f"wrote {written_path}")
    return 0


def _add_detector_options(parser: argparse.ArgumentParser, default_threshold: float) -> None:
    parser.add_argument(
        "--weights", required=True, help="a checkpoint detrkit.load reads (.pth or a directory)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    parser.add_argument(
        "--threshold",
        type=threshold,
        default=default_threshold,
        help=f"minimum score of a detection (default {default_threshold})",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    add_image_size_options(parser)
    add_precision_option(parser, default="fp32")


def add_image_size_options(parser: argparse.ArgumentParser) -> None:
    """``--short-side`` and ``--max-size``: how images are resized before the model sees them."""
    parser.add_argument(
        "--short-side",
        type=non_negative_int,
        help=f"resize images to this short side, 0 to keep them (default {SHORT_SIDE}, or "
        "scaled by the image_scale of the training run the checkpoint comes from)",
    )
    parser.add_argument(
        "--max-size",
        type=positive_int,
        help=f"bound on the long side (default {MAX_SIZE}); with or without --short-side, "
        "giving it turns off the training run's image_scale",
    )


def image_sizes(args: argparse.Namespace) -> dict:
    """The Detector's ``size`` and ``max_size`` that ``--short-side`` and ``--max-size`` ask for;
    empty when neither is given, so that a checkpoint's training scale applies."""
    if args.short_side is None and args.max_size is None:
        return {}
    short_side = SHORT_SIDE if args.short_side is None else args.short_side
    return {"size": short_side or None, "max_size": args.max_size or MAX_SIZE}


def recorded_resize(args: argparse.Namespace, doing: str) -> tuple[int | None, int]:
    """The ``(short side, max size)`` images go to (``doing``: resizing for a run, or an export
    or a processor's settings that record a resize): ``--short-side`` and ``--max-size`` when
    given, else 800 and 1333 scaled by the image_scale of the training run that wrote
    ``--weights``, as Detector.from_checkpoint resizes; the run's scale is said on stderr."""
    sizes = image_sizes(args)
    if sizes:
        return sizes["size"], sizes["max_size"]
    found = training_image_scale(args.weights)
    if found is None:
        return SHORT_SIDE, MAX_SIZE
    short_side, max_size = scaled_image_size(found[0])
    print(
        f"detrkit: {doing} to short side {short_side}, long side at most {max_size} "
        f"(image_scale {found[0]} of the training run, {found[1]})",
        file=sys.stderr,
    )
    return short_side, max_size


def add_inference_commands(commands) -> None:
    """Adds ``predict`` and ``explain`` to the ``detrkit`` subcommands."""
    predict = commands.add_parser(
        "predict",
        help="detect objects in images; write annotated images and COCO results",
        description="Detects objects in image files, folders or glob patterns; writes each image "
        "with its detections drawn, detections.json (COCO results format) and images.json (the "
        "image ids); a panoptic model's masks are drawn under the boxes and written as RLE "
        "segmentations. Unreadable inputs are reported and skipped (exit status 1).",
    )
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs")
    _add_detector_options(predict, default_threshold=0.5)
    predict.add_argument("--batch-size", type=positive_int, default=1, help="images per forward")
    predict.add_argument(
        "--panoptic",
        action="store_true",
        help="also write each image's panoptic segmentation in COCO's panoptic format: "
        "OUT/panoptic/NAME.png and OUT/panoptic.json (DETR's panoptic models, e.g. "
        "detr_r50_panoptic)",
    )
    predict.add_argument(
        "--panoptic-threshold",
        type=threshold,
        default=PANOPTIC_THRESHOLD,
        help="with --panoptic: minimum score of a query to take part in the segmentation "
        f"(default {PANOPTIC_THRESHOLD}, the original's)",
    )
    predict.set_defaults(run=cmd_predict)

    explain = commands.add_parser(
        "explain",
        help="figures of what the model looks at for each detected object",
        description="DETR: each object's cross-attention map (heads averaged and per head) and "
        "the encoder self-attention of chosen pixels. Deformable DETR: each object's reference "
        "and sampling points on every level for every decoder layer, its box after every layer "
        "(box refinement), and the encoder sampling points of chosen pixels; one marker shape "
        "per head, panels zoomed to small objects, a legend in every figure. PNG figures; "
        "detrkit explore shows the same interactively.",
    )
    explain.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, folders or globs (several: a folder per image in --out)",
    )
    _add_detector_options(explain, default_threshold=0.5)
    explain.add_argument(
        "--pixel",
        type=pixel,
        action="append",
        metavar="X,Y",
        help="an image pixel whose encoder attention to draw (repeatable; default: the centres "
        "of up to 3 detected objects)",
    )
    explain.add_argument(
        "--max-objects", type=positive_int, default=5, help="explain at most this many objects"
    )
    explain.set_defaults(run=cmd_explain)
