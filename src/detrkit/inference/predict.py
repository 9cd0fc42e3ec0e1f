"""``detrkit predict``: detections on image files, drawn and written as COCO results; for DETR's
panoptic models with their masks, and optionally as a COCO panoptic segmentation."""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from detrkit.data import ImageReadError, read_image
from detrkit.data.coco import to_coco_results
from detrkit.data.digits import panoptic_png
from detrkit.data.drawing import draw_detections, draw_masks
from detrkit.files import existing_results, write_atomically
from detrkit.inference.detector import Detector, no_masks_message
from detrkit.models.deformable_transformer import ImageTooSmallError
from detrkit.models.postprocess import PANOPTIC_THRESHOLD, Detections, PanopticResult

# Files a folder contributes (an explicitly named file is tried whatever its suffix).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESULTS_FILE = "detections.json"  # COCO results format: a list of detections
IMAGES_FILE = "images.json"  # COCO "images" entries: which image_id is which file
# --panoptic: COCO's panoptic format, the JSON and a folder of PNGs named after it.
PANOPTIC_FILE, PANOPTIC_DIR = "panoptic.json", "panoptic"


@dataclass
class PredictReport:
    """What :func:`predict_files` did."""

    pictures: list[Path] = field(default_factory=list)  # annotated images written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    results_file: Path | None = None
    images_file: Path | None = None
    detections: int = 0
    panoptic_file: Path | None = None  # with panoptic: the COCO panoptic JSON
    segments: int = 0  # with panoptic: segments written


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, sorted, not recursing) and glob patterns (``**``
    recurses) -> the image paths, in order and without repeats, and the inputs that named
    nothing, with why."""
    paths: dict[Path, None] = {}
    problems = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((text, "a folder without image files"))
        elif path.exists():
            found = [path]
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                problems.append((text, "a pattern that matches no file"))
        else:
            found = []
            problems.append((text, "no such file or folder"))
        paths.update(dict.fromkeys(found))
    return list(paths), problems


def image_ids(paths: Sequence[Path]) -> list[int]:
    """COCO image ids: the file names themselves when all are distinct numbers (as COCO's own
    ``000000397133.jpg``, so results match its annotations), else 1, 2, 3... in order."""
    stems = [path.stem for path in paths]
    if all(stem.isdigit() for stem in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(paths) + 1))


def output_names(paths: Sequence[Path]) -> list[str]:
    """One distinct output file name per input: its stem, ``.jpg`` for JPEG inputs and ``.png``
    for the rest, with ``_2``, ``_3``... when two inputs share a name."""
    names, used = [], set()
    for path in paths:
        suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
        name, n = path.stem + suffix, 1
        while name.lower() in used:
            n += 1
            name = f"{path.stem}_{n}{suffix}"
        used.add(name.lower())
        names.append(name)
    return names


def _detect_or_skip(
    detector: Detector,
    batch: list[tuple[int, Tensor]],
    paths: Sequence[Path],
    skip: Callable[[str, str], None],
    panoptic_threshold: float | None = None,
) -> list[tuple[tuple[int, Tensor], Detections, PanopticResult | None]]:
    """Each (index, image) of ``batch`` with its detections and, given a
    ``panoptic_threshold``, its panoptic segmentation (else None). An image too small for the
    model goes to ``skip``; when a batch is, its images are tried one at a time (padded
    together, they are as large as the largest)."""
    try:
        run = detector.run([pixels for _, pixels in batch])
    except ImageTooSmallError as error:
        if len(batch) == 1:
            skip(str(paths[batch[0][0]]), str(error))
            return []
        return [
            found
            for item in batch
            for found in _detect_or_skip(detector, [item], paths, skip, panoptic_threshold)
        ]
    found = detector.detections(run)
    segmented = (
        detector.panoptic_segments(run, panoptic_threshold)
        if panoptic_threshold is not None
        else [None] * len(batch)
    )
    return list(zip(batch, found, segmented))


def _read_batches(
    paths: Sequence[Path], batch_size: int, skip: Callable[[str, str], None]
) -> Iterator[list[tuple[int, Tensor]]]:
    """Batches of (index into paths, RGB uint8 image); unreadable files go to ``skip``."""
    batch = []
    for index, path in enumerate(paths):
        try:
            batch.append((index, read_image(path)))
        except ImageReadError as error:
            skip(str(path), str(error).removeprefix(f"{path}: "))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_picture(pixels: Tensor, path: Path) -> None:
    """Writes an RGB ``uint8`` ``[3, H, W]`` image atomically (JPEG or PNG by suffix)."""
    picture = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    if path.suffix == ".jpg":
        write_atomically(path, lambda tmp: picture.save(tmp, format="JPEG", quality=95))
    else:
        write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def draw_prediction(pixels: Tensor, detections: Detections) -> Tensor:
    """An image with its detections drawn: the masks (where the model has them), each under its
    box, in the box's colour."""
    if detections.masks is not None:
        pixels = draw_masks(pixels, detections.masks, detections.labels)
    return draw_detections(pixels, detections.boxes, detections.captions(), detections.labels)


def segments_info(segmentation: PanopticResult) -> list[dict]:
    """A panoptic segmentation's segments as COCO panoptic ``segments_info``: ``id``,
    ``category_id``, ``isthing``, ``iscrowd`` (0), ``area`` and ``bbox`` (x, y, w, h of its
    pixels), with the ``score``."""
    ids = segmentation.segment_ids
    info = []
    for segment in segmentation.segments:
        rows, cols = torch.nonzero(ids == segment.id, as_tuple=True)
        x, y = int(cols.min()), int(rows.min())
        bbox = [x, y, int(cols.max()) + 1 - x, int(rows.max()) + 1 - y]
        info.append(
            {
                "id": segment.id,
                "category_id": segment.category_id,
                "isthing": int(segment.isthing),
                "iscrowd": 0,
                "area": segment.area,
                "bbox": bbox,
                "score": round(segment.score, 5),
            }
        )
    return info


def panoptic_categories(detector: Detector) -> list[dict]:
    """The COCO panoptic ``categories`` of the model's classes (``id``: the category id,
    ``name``, ``isthing``), without the "N/A" gaps of COCO's ids."""
    ids = detector.config.category_ids or range(detector.config.num_classes)
    return [
        {"id": int(category_id), "name": name, "isthing": int(thing)}
        for category_id, name, thing in zip(
            ids, detector.class_names, detector.config.thing_classes()
        )
        if name != "N/A"
    ]


def save_panoptic_png(segment_ids: Tensor, path: Path) -> None:
    """Writes segment ids ``[H, W]`` as a COCO panoptic PNG (id = R + 256 G + 256^2 B)."""
    picture = Image.fromarray(panoptic_png(segment_ids.cpu().numpy().astype(np.int64)))
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def _write_json(path: Path, value) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value) + "\n"))


def predict_files(
    detector: Detector,
    inputs: Sequence[str],
    out: str | Path,
    batch_size: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    panoptic: bool = False,
    panoptic_threshold: float = PANOPTIC_THRESHOLD,
) -> PredictReport:
    """Detects objects in every image ``inputs`` name and writes into ``out``: each image with
    its detections drawn, ``detections.json`` (COCO results: image_id, category_id = the label,
    bbox as x, y, w, h, score) and ``images.json`` (the COCO "images" entries of those ids).
    A model with masks draws each detection's mask under its box and adds its
    ``segmentation`` (compressed RLE) to detections.json.

    ``panoptic`` (a model with masks only): also each image's panoptic segmentation
    (:meth:`Detector.panoptic_segments`, queries scoring above ``panoptic_threshold``) as COCO's
    panoptic format: ``panoptic/<name>.png`` (segment id = R + 256 G + 256^2 B, 0 for none) and
    ``panoptic.json`` (images, annotations with their ``segments_info``, categories).

    Inputs that name nothing or cannot be read are reported on stderr and skipped; the others
    are processed. Raises ValueError when no input names a file, when an output would
    overwrite an input, or for ``panoptic`` with a model without masks; FileExistsError when
    ``out`` holds earlier results, unless ``overwrite``. Nothing is written before these checks.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if panoptic and not detector.has_masks:
        raise ValueError(no_masks_message(detector.config))
    out = Path(out)
    paths, problems = expand_inputs(inputs)
    report = PredictReport()

    def skip(name: str, why: str) -> None:
        report.skipped.append((name, why))
        tqdm.write(f"detrkit: skipped {name}: {why}", file=sys.stderr)

    if not paths:  # one error naming every input, not a line each first
        raise ValueError(
            "no image files to predict: " + "; ".join(f"{n}: {w}" for n, w in problems)
        )
    for name, why in problems:
        skip(name, why)
    names = output_names(paths)
    targets = [out / name for name in names]
    results_file, images_file = out / RESULTS_FILE, out / IMAGES_FILE
    outputs = [*targets, results_file, images_file]
    png_targets: list[Path] = []
    if panoptic:
        # PNG names distinct even where two inputs differ only in their suffix.
        png_names = output_names([path.with_suffix(".png") for path in paths])
        png_targets = [out / PANOPTIC_DIR / name for name in png_names]
        outputs += [*png_targets, out / PANOPTIC_FILE]
    inputs_resolved = {path.resolve() for path in paths}
    for target in outputs:
        if target.resolve() in inputs_resolved:
            where = target.relative_to(out)
            raise ValueError(f"--out {out}: writing {where} would overwrite an input image")
    existing_results(outputs, f"--out {out}", overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if panoptic:
        (out / PANOPTIC_DIR).mkdir(exist_ok=True)

    done: list[tuple[int, Detections]] = []  # (index into paths, detections)
    segmented: list[list[dict]] = []  # with panoptic: each done image's segments_info
    bar = tqdm(
        total=len(paths), unit="image", desc="predict", disable=not progress or len(paths) < 2
    )
    with bar:
        for batch in _read_batches(paths, batch_size, skip):
            threshold = panoptic_threshold if panoptic else None
            for (index, pixels), detections, segmentation in _detect_or_skip(
                detector, batch, paths, skip, threshold
            ):
                save_picture(draw_prediction(pixels, detections), targets[index])
                report.pictures.append(targets[index])
                if segmentation is not None:
                    save_panoptic_png(segmentation.segment_ids, png_targets[index])
                    segmented.append(segments_info(segmentation))
                done.append((index, detections))
            bar.update(batch[-1][0] + 1 - bar.n)  # skipped files count as done too
        bar.update(len(paths) - bar.n)

    # Ids from the images that were read: a stray unreadable file does not turn numeric names
    # (COCO's ids) into 1, 2, 3... Numbered so, the ids count read images; images.json maps them.
    ids = image_ids([paths[index] for index, _ in done])
    results, images = [], []
    for image_id, (index, detections) in zip(ids, done):
        results.extend(
            to_coco_results(image_id, detections.as_dict(), detector.config.category_ids)
        )
        height, width = detections.image_size
        entry = {"id": image_id, "file_name": str(paths[index]), "height": height, "width": width}
        images.append(entry)
    report.detections = len(results)
    report.results_file, report.images_file = results_file, images_file
    _write_json(report.results_file, results)
    _write_json(report.images_file, images)
    if panoptic:
        annotations = [
            {"image_id": image_id, "file_name": png_targets[index].name, "segments_info": info}
            for image_id, (index, _), info in zip(ids, done, segmented)
        ]
        report.panoptic_file = out / PANOPTIC_FILE
        report.segments = sum(len(info) for info in segmented)
        value = {
            "images": images,
            "annotations": annotations,
            "categories": panoptic_categories(detector),
        }
        _write_json(report.panoptic_file, value)
    return report


def category_ids_note(detector: Detector) -> str:
    """What ``category_id`` means in detections.json for this model."""
    if detector.config.category_ids is not None:
        return "category_id is the training dataset's category id"
    if detector.config.num_classes == 91 and detector.config.class_names is None:
        return "category_id is the COCO category id"
    return "category_id is the model's class index (0-based)"
