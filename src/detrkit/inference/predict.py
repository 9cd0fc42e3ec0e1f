"""``detrkit predict``: detections on image files, drawn and written as COCO results."""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor
from tqdm import tqdm

from detrkit.data import ImageReadError, read_image
from detrkit.data.coco import to_coco_results
from detrkit.data.drawing import draw_detections
from detrkit.files import existing_results, write_atomically
from detrkit.inference.detector import Detections, Detector
from detrkit.models.deformable_transformer import ImageTooSmallError

# Files a folder contributes (an explicitly named file is tried whatever its suffix).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESULTS_FILE = "detections.json"  # COCO results format: a list of detections
IMAGES_FILE = "images.json"  # COCO "images" entries: which image_id is which file


@dataclass
class PredictReport:
    """What :func:`predict_files` did."""

    pictures: list[Path] = field(default_factory=list)  # annotated images written
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    results_file: Path | None = None
    images_file: Path | None = None
    detections: int = 0


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
) -> list[tuple[tuple[int, Tensor], Detections]]:
    """Each (index, image) of ``batch`` with its detections. An image too small for the model
    goes to ``skip``; when a batch is, its images are tried one at a time (padded together,
    they are as large as the largest)."""
    try:
        found, _ = detector.detect([pixels for _, pixels in batch])
    except ImageTooSmallError as error:
        if len(batch) == 1:
            skip(str(paths[batch[0][0]]), str(error))
            return []
        return [pair for item in batch for pair in _detect_or_skip(detector, [item], paths, skip)]
    return list(zip(batch, found))


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


def _write_json(path: Path, value) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value) + "\n"))


def predict_files(
    detector: Detector,
    inputs: Sequence[str],
    out: str | Path,
    batch_size: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictReport:
    """Detects objects in every image ``inputs`` name and writes into ``out``: each image with
    its detections drawn, ``detections.json`` (COCO results: image_id, category_id = the label,
    bbox as x, y, w, h, score) and ``images.json`` (the COCO "images" entries of those ids).

    Inputs that name nothing or cannot be read are reported on stderr and skipped; the others
    are processed. Raises ValueError when no input names a file, or when an output would
    overwrite an input; FileExistsError when ``out`` holds earlier results, unless ``overwrite``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
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
    inputs_resolved = {path.resolve() for path in paths}
    for target in targets:
        if target.resolve() in inputs_resolved:
            raise ValueError(f"--out {out}: writing {target.name} would overwrite an input image")
    results_file, images_file = out / RESULTS_FILE, out / IMAGES_FILE
    existing_results([*targets, results_file, images_file], f"--out {out}", overwrite)
    out.mkdir(parents=True, exist_ok=True)

    done: list[tuple[int, Detections]] = []  # (index into paths, detections)
    bar = tqdm(
        total=len(paths), unit="image", desc="predict", disable=not progress or len(paths) < 2
    )
    with bar:
        for batch in _read_batches(paths, batch_size, skip):
            for (index, pixels), detections in _detect_or_skip(detector, batch, paths, skip):
                drawn = draw_detections(
                    pixels, detections.boxes, detections.captions(), detections.labels
                )
                save_picture(drawn, targets[index])
                report.pictures.append(targets[index])
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
    return report


def category_ids_note(detector: Detector) -> str:
    """What ``category_id`` means in detections.json for this model."""
    if detector.config.category_ids is not None:
        return "category_id is the training dataset's category id"
    if detector.config.num_classes == 91 and detector.config.class_names is None:
        return "category_id is the COCO category id"
    return "category_id is the model's class index (0-based)"
