"""Checking a COCO-format dataset before training on it: every problem, counted, with examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from detrkit.data.coco import is_xywh, read_coco_json, read_image

Severity = Literal["error", "warning"]

MAX_EXAMPLES = 3


@dataclass
class Problem:
    """One kind of problem: how often it occurs and a few of the places."""

    kind: str
    severity: Severity
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What :func:`check_dataset` found. Errors make the dataset unusable; warnings do not (the
    loader clips, drops or skips what they point at)."""

    images_dir: Path
    annotations_json: Path
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    problems: dict[str, Problem] = field(default_factory=dict)

    def add(self, kind: str, severity: Severity, description: str, example: str = "") -> None:
        """Counts one occurrence of a problem."""
        problem = self.problems.setdefault(kind, Problem(kind, severity, description))
        problem.count += 1
        if example and len(problem.examples) < MAX_EXAMPLES:
            problem.examples.append(example)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems.values() if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems.values() if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when the dataset is usable (warnings allowed)."""
        return not self.errors

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def format(self) -> str:
        """The report as readable text."""
        lines = [
            f"annotations: {self.annotations_json}",
            f"images:      {self.images_dir}",
            f"found {self.num_images} images, {self.num_annotations} annotations, "
            f"{self.num_categories} categories",
        ]
        for title, problems in (("errors", self.errors), ("warnings", self.warnings)):
            if problems:
                lines.append(f"{title}:")
            for problem in problems:
                lines.append(f"  [{problem.kind}] {problem.count} x {problem.description}")
                lines.extend(f"      e.g. {example}" for example in problem.examples)
        if self.ok:
            lines.append(f"OK: usable, {len(self.warnings)} kinds of warnings")
        else:
            lines.append(f"UNUSABLE: {len(self.errors)} kinds of errors")
        return "\n".join(lines)


def check_dataset(
    images_dir: str | Path, annotations_json: str | Path, decode_images: bool = True
) -> Report:
    """Checks a COCO instances file and its images; never raises for problems in the data.

    ``decode_images=False`` only reads the image headers: much faster, but truncated files go
    unnoticed.
    """
    report = Report(Path(images_dir), Path(annotations_json))
    try:
        data = read_coco_json(annotations_json)
    except (OSError, ValueError) as error:
        report.add("invalid_annotations_file", "error", "annotations file unusable", str(error))
        return report
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])

    categories = _index(report, data["categories"], "categories", "category", ("id",))
    images = _index(report, data["images"], "images", "image", ("id", "file_name"))
    if not images:
        report.add("no_images", "error", "the file lists no (valid) image")
    if not categories:
        report.add("no_categories", "error", "the file lists no (valid) category")
    sizes = _check_images(report, images, decode_images)
    if images and not sizes:
        report.add("no_readable_images", "error", "none of the images can be read", "")
    _check_annotations(report, data["annotations"], images, categories, sizes)
    return report


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index(
    report: Report, entries: list[Any], section: str, singular: str, fields: tuple[str, ...]
) -> dict[int, dict[str, Any]]:
    """Entries by id; malformed entries and repeated ids are reported (the first one wins)."""
    by_id: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or any(name not in entry for name in fields)
            or not _is_id(entry["id"])
        ):
            required = " and ".join(("an integer id", *fields[1:]))
            report.add(
                f"malformed_{singular}",
                "warning",
                f"{section} entries lacking {required} (ignored)",
                f"{section}[{i}]",
            )
            continue
        if entry["id"] in by_id:
            report.add(
                f"duplicate_{singular}_id",
                "warning",
                f"{section} entries repeating an earlier id (the first is used)",
                f"{section}[{i}] id {entry['id']}",
            )
            continue
        by_id[entry["id"]] = entry
    return by_id


def _check_images(
    report: Report, images: dict[int, dict[str, Any]], decode: bool
) -> dict[int, tuple[int, int]]:
    """The ``(height, width)`` of every readable image, by id."""
    sizes = {}
    for image_id, entry in images.items():
        path = report.images_dir / str(entry["file_name"])
        where = f"{entry['file_name']} (image id {image_id})"
        if not path.is_file():
            report.add("missing_image_file", "warning", "image files that do not exist", where)
            continue
        try:
            if decode:
                height, width = read_image(path).shape[-2:]
            else:
                with Image.open(path) as pil:
                    width, height = pil.size
        except Exception as error:  # Pillow signals broken files with many exception types
            report.add(
                "unreadable_image",
                "warning",
                "image files that cannot be decoded (truncated or not images)",
                f"{where}: {error}",
            )
            continue
        listed = (entry.get("height"), entry.get("width"))
        if None not in listed and listed != (height, width):
            report.add(
                "image_size_mismatch",
                "warning",
                "images whose size differs from the JSON's height/width (boxes may be off)",
                f"{where}: JSON {listed[1]}x{listed[0]}, file {width}x{height} (width x height)",
            )
        sizes[image_id] = (int(height), int(width))
    return sizes


def _check_annotations(
    report: Report,
    annotations: list[Any],
    images: dict[int, dict[str, Any]],
    categories: dict[int, dict[str, Any]],
    sizes: dict[int, tuple[int, int]],
) -> None:
    annotation_ids: set[int] = set()
    annotated: set[int] = set()
    usable = 0
    for i, annotation in enumerate(annotations):
        fields = ("image_id", "category_id", "bbox")
        if (
            not isinstance(annotation, dict)
            or any(name not in annotation for name in fields)
            or not is_xywh(annotation["bbox"])
            or not all(_is_id(annotation[name]) for name in fields[:2])
        ):
            # CocoDetection refuses such a file (it would not guess what the entry meant).
            report.add(
                "malformed_annotation",
                "error",
                "annotations lacking an integer image_id or category_id, or a bbox of 4 finite "
                "numbers",
                f"annotations[{i}]",
            )
            continue
        where = f"annotations[{i}] (image id {annotation['image_id']})"
        if not _is_id(annotation.get("id")):
            report.add(
                "annotation_without_id",
                "warning",
                "annotations without an integer id (fine for training; pycocotools, which "
                "evaluates on this file, needs one)",
                where,
            )
        elif annotation["id"] in annotation_ids:
            report.add(
                "duplicate_annotation_id",
                "warning",
                "annotations repeating an earlier id",
                f"annotation id {annotation['id']} (image id {annotation['image_id']})",
            )
        else:
            annotation_ids.add(annotation["id"])
        bbox = annotation["bbox"]
        if annotation["image_id"] not in images:
            report.add(
                "unknown_image_id", "warning", "annotations of images not in the file", where
            )
            continue
        if annotation["category_id"] not in categories:
            report.add(
                "unknown_category_id",
                "warning",
                "annotations of categories not in the file (ignored)",
                f"{where}: category_id {annotation['category_id']}",
            )
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            report.add(
                "empty_box",
                "warning",
                "boxes of zero or negative width or height (dropped)",
                f"{where}: bbox {bbox}",
            )
            continue
        size = sizes.get(annotation["image_id"])
        if size is not None and (x < 0 or y < 0 or x + w > size[1] or y + h > size[0]):
            inside = x < size[1] and y < size[0] and x + w > 0 and y + h > 0
            report.add(
                "box_outside_image",
                "warning",
                "boxes reaching outside their image (clipped; dropped if wholly outside)",
                f"{where}: bbox {bbox} in {size[1]}x{size[0]}"
                + ("" if inside else ", wholly outside"),
            )
            if not inside:
                continue
        if not annotation.get("iscrowd", 0):
            annotated.add(annotation["image_id"])
            usable += 1
    for image_id, entry in images.items():
        if image_id not in annotated:
            report.add(
                "image_without_annotations",
                "warning",
                "images with no (non-crowd) annotation: trained on as background only",
                f"{entry['file_name']} (image id {image_id})",
            )
    if images and not usable:
        report.add("no_annotations", "error", "no usable annotation in the whole file")
