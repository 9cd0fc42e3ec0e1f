"""``detrkit explore`` and ``detrkit trace``: one forward pass, seen from inside."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from detrkit.cli.arguments import model_option, positive_int, threshold
from detrkit.cli.inference import add_image_size_options, image_sizes
from detrkit.models import available_models


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    """``--weights CKPT | --model PRESET`` (random weights) and ``--model-option``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="a checkpoint detrkit.load reads (.pth or a directory)")
    source.add_argument("--model", choices=available_models(), help="a preset, with random weights")
    parser.add_argument(
        "--model-option",
        action="append",
        type=model_option,
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the preset (e.g. enc_layers=2); with --model only",
    )


def reference_detector(args: argparse.Namespace, threshold_value: float):
    """A Detector running the reference model (not an optimised copy: the page and the trace
    point at the reference code) from ``--weights`` or ``--model``, and a name for its source."""
    from detrkit.inference import Detector
    from detrkit.models import build_model

    sizes = image_sizes(args)
    if args.weights is not None:
        if args.model_option:
            raise ValueError("--model-option: only with --model (a checkpoint has its own config)")
        detector = Detector.from_checkpoint(
            args.weights, device="cpu", threshold=threshold_value, **sizes
        )
        return detector, os.path.basename(os.path.normpath(args.weights))
    model = build_model(args.model, **dict(args.model_option))
    detector = Detector(model, threshold=threshold_value, device="cpu", **sizes)
    return detector, f"{args.model} (random weights)"


def check_page_path(out: Path, overwrite: bool) -> None:
    """Raises ValueError (or FileExistsError) when ``--out`` cannot take the page, before any
    work is done."""
    from detrkit.files import existing_results

    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; give the page's file name")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out}: the page must end in .html")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {out}: the folder {parent} does not exist")
    existing_results([out], f"--out {out}", overwrite)
    # Try, before the model runs: permissions, read-only and special file systems all show here.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write into {parent} ({error.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def cmd_explore(args: argparse.Namespace) -> int:
    """Writes the interactive page of one forward pass."""
    from detrkit.data import ImageReadError, read_image
    from detrkit.inference.explore import explore

    check_page_path(args.out, args.overwrite)
    try:
        image = read_image(Path(args.image))
    except ImageReadError as error:
        raise ValueError(str(error)) from None
    detector, source = reference_detector(args, args.threshold)
    path, data = explore(
        detector, image, args.out, f"{source} on {Path(args.image).name}", overwrite=args.overwrite
    )
    size = path.stat().st_size
    found = len(data["detections"])
    print(
        f"wrote {path} ({size / 1e6:.1f} MB): {data['variant']}, {found} "
        f"detection{'' if found == 1 else 's'} at threshold {data['threshold']}"
        + (
            ""
            if found
            else f" (the highest score was {data['best']['score']:.3f}, "
            f"{data['best']['label']!r}, query {data['best']['query']})"
        )
    )
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Prints the data flow of one forward pass: a preset on a random image, or a checkpoint
    (or preset) on an image."""
    from detrkit.data import ImageReadError, read_image
    from detrkit.inference.trace import format_trace, trace_model

    if args.image is not None:
        try:
            image = read_image(Path(args.image))
        except ImageReadError as error:
            raise ValueError(str(error)) from None
        detector, source = reference_detector(args, 0.5)
        batch, _ = detector.preprocess([image])
        nodes = trace_model(detector.model, batch)
        where = f"{Path(args.image).name} resized to {batch.shape[-2]}x{batch.shape[-1]}"
    else:
        if args.weights is not None:
            from detrkit.checkpoints import load

            model, source = load(args.weights, map_location="cpu"), args.weights
        else:
            from detrkit.models import build_model

            model = build_model(args.model, **dict(args.model_option))
            source = args.model
        height, width = args.size
        nodes = trace_model(model, size=(height, width))
        where = f"one random {height}x{width} image"
        detector = None
    config = (detector.model if detector else model).config
    title = (
        f"{source} on {where}: B = 1 image, C = {config.hidden_dim} channels, "
        f"M = {config.nheads} heads, Q = {config.num_queries} object queries; "
        "repeated layers are one block (xN)"
    )
    print(format_trace(nodes, title))
    return 0


def add_explore_commands(commands) -> None:
    """Adds ``explore`` and ``trace`` to the ``detrkit`` subcommands."""
    explore = commands.add_parser(
        "explore",
        help="an interactive page of one forward pass: the network, attention and sampling points",
        description="Runs the model once on IMAGE, records its internals and writes ONE "
        "self-contained HTML page (no network needed to view it): the network as it ran, "
        "with every tensor's shape, code line and statistics; the detections; for any query, "
        "its box, reference points and sampling points (Deformable DETR) or cross-attention "
        "(DETR) in every decoder layer, per head and level; for any pixel, the encoder's.",
    )
    explore.add_argument("image", metavar="IMAGE", help="an image file")
    _add_model_source(explore)
    explore.add_argument("--out", required=True, type=Path, help="the page to write (.html)")
    explore.add_argument(
        "--threshold", type=threshold, default=0.5, help="minimum score of a detection (0.5)"
    )
    explore.add_argument("--overwrite", action="store_true", help="replace an earlier page")
    add_image_size_options(explore)
    explore.set_defaults(run=cmd_explore)

    trace = commands.add_parser(
        "trace",
        help="print the data flow of one forward pass, stage by stage, with tensor shapes",
        description="Runs one forward pass with hooks and prints every tensor it computes, "
        "with its shape and what it is, repeated layers collapsed into one block. Without "
        "--image: one random image of --size.",
    )
    _add_model_source(trace)
    trace.add_argument("--image", help="an image file to run on (resized as detrkit predict does)")
    trace.add_argument(
        "--size",
        nargs=2,
        type=positive_int,
        default=(800, 1066),
        metavar=("H", "W"),
        help="without --image: the random image's height and width (default 800 1066)",
    )
    add_image_size_options(trace)
    trace.set_defaults(run=cmd_trace)
