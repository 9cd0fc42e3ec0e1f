"""Checking a dataset before training on it (COCO files, Pascal VOC, YOLO): every problem,
counted, with examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from detrkit.data.coco import ImageReadError, read_coco_json, read_image
from detrkit.data.panoptic import (
    PanopticIndex,
    default_panoptic_dir,
    png_findings,
    read_segment_ids,
    validate_panoptic,
)
from detrkit.data.validate import CocoIndex, Finding, Severity, image_file_findings, validate_coco

MAX_EXAMPLES = 3
SPLITS = ("train", "val")


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
    # A panoptic set's (check_panoptic): the folder of its PNGs and its number of segments.
    panoptic_dir: Path | None = None
    num_segments: int = 0

    def add(self, kind: str, severity: Severity, description: str, example: str = "") -> None:
        """Counts one occurrence of a problem."""
        problem = self.problems.setdefault(kind, Problem(kind, severity, description))
        problem.count += 1
        if example and len(problem.examples) < MAX_EXAMPLES:
            problem.examples.append(example)

    def record(self, finding: Finding) -> None:
        """Counts one finding of :mod:`detrkit.data.validate` under its kind."""
        self.add(finding.kind, finding.severity, finding.description, finding.detail)

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
        if self.panoptic_dir is not None:
            lines.insert(2, f"PNGs:        {self.panoptic_dir}")
            lines[-1] += f", {self.num_segments} segments"
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
    images_dir: str | Path,
    annotations_json: str | Path,
    decode_images: bool = True,
    masks: bool = False,
) -> Report:
    """Checks a COCO instances file and its images; never raises for problems in the data.

    The file goes through the rules :class:`~detrkit.data.CocoDetection` applies
    (:func:`~detrkit.data.validate.validate_coco`): every error reported here is one the loader
    refuses the file for, every warning something it leaves out or clips. The report is also an
    error where no object could be trained on, and where listed image files are missing, not
    files or cannot be decoded (evaluation refuses those; training skips them).
    ``decode_images=False`` only reads the image headers: much faster, but truncated files go
    unnoticed.

    ``masks``: checks the file as ``CocoDetection(..., masks=True)`` reads it: every kept object
    needs a segmentation that decodes at its image's size (bad polygons and RLE are errors,
    not warnings), and an image file whose size is not the JSON's is an error.
    """
    report = Report(Path(images_dir), Path(annotations_json))
    data = _read_counted(report, annotations_json, "instances")
    if data is None:
        return report

    _check_instances(report, data, decode_images, masks)
    return report


def _check_instances(
    report: Report,
    data: dict,
    decode_images: bool,
    masks: bool,
    located: Callable[[Finding], Finding] = lambda finding: finding,
) -> None:
    """Records the findings of the instances ``data`` and of its image files; ``located``
    rewrites each finding of the COCO rules (to name the place in the file it came from)."""
    index = validate_coco(data, masks=masks)
    for finding in index.findings:
        report.record(located(finding))
    reason = index.untrainable_reason()
    if reason is not None and index.images:
        report.record(Finding("not_trainable", reason))
    _check_image_files(report, index, decode_images, masks)


def check_format(data: str, decode_images: bool = True, masks: bool = False) -> list[Report]:
    """Checks the train and val splits of ``voc:ROOT`` or ``yolo:DATA_YAML``, one report each:
    the format's own problems (malformed XML or label lines, class ids outside data.yaml's
    names, label files without images and images without labels, naming file and line), then
    every rule :func:`check_dataset` applies to the COCO instances they make (see
    :mod:`detrkit.data.formats`). Never raises for problems in the data."""
    from detrkit.data.formats import read_split

    reports = []
    for split in SPLITS:
        converted = read_split(data, split)
        report = Report(converted.images_dir, converted.source)
        report.num_images = len(converted.coco["images"])
        report.num_annotations = len(converted.coco["annotations"])
        report.num_categories = len(converted.coco["categories"])
        for finding in converted.findings:
            report.record(finding)
        if not any(finding.kind in _UNREAD for finding in converted.findings):
            _check_instances(report, converted.coco, decode_images, masks, converted.located)
        reports.append(report)
    return reports


# Findings after which a split has no images to check: what describes them was not read.
_UNREAD = ("invalid_data_yaml", "missing_split")


def _read_counted(report: Report, path: str | Path, what: str) -> dict | None:
    """The JSON file with its entries counted into ``report``; None (and the finding recorded)
    when it cannot be read as a COCO ``what`` file."""
    try:
        data = read_coco_json(path, what=what)
    except (OSError, ValueError) as error:
        report.record(Finding("invalid_annotations_file", str(error)))
        return None
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])
    return data


def check_panoptic(
    images_dir: str | Path,
    panoptic_json: str | Path,
    panoptic_dir: str | Path | None = None,
    decode_images: bool = True,
) -> Report:
    """Checks a COCO panoptic set: its JSON (the rules of
    :func:`~detrkit.data.panoptic.validate_panoptic`), its images as :func:`check_dataset` does,
    and each annotation's PNG in ``panoptic_dir`` (default: the JSON's path without ``.json``):
    missing or not decodable, of another size than its image, holding ids its segments_info
    does not list (errors: :class:`~detrkit.data.CocoPanoptic` refuses them) or listing segments
    without a pixel (warnings: left out). The PNGs are always decoded, ``decode_images`` only
    concerns the images. Never raises for problems in the data."""
    panoptic_dir = Path(
        default_panoptic_dir(panoptic_json) if panoptic_dir is None else panoptic_dir
    )
    report = Report(Path(images_dir), Path(panoptic_json), panoptic_dir=panoptic_dir)
    data = _read_counted(report, panoptic_json, "panoptic")
    if data is None:
        return report
    index = validate_panoptic(data)
    report.num_segments = sum(len(entry.segments) for entry in index.panoptic.values())
    for finding in index.findings:
        report.record(finding)
    sizes = _check_image_files(report, index, decode_images)
    _check_pngs(report, index, sizes)
    return report


def _check_pngs(report: Report, index: PanopticIndex, sizes: dict[int, tuple[int, int]]) -> None:
    assert report.panoptic_dir is not None
    if not report.panoptic_dir.is_dir():
        report.record(Finding("no_panoptic_dir", str(report.panoptic_dir)))
        return
    for image_id, entry in index.panoptic.items():
        where = f"{entry.file_name} (image id {image_id})"
        path = report.panoptic_dir / entry.file_name
        if not path.is_file():
            report.record(Finding("missing_panoptic_png", f"{where}: no such file"))
            continue
        try:
            ids = read_segment_ids(path)
        except ImageReadError as error:
            report.record(Finding("unreadable_panoptic_png", f"{where}: {error}"))
            continue
        image = index.images[image_id]
        size = sizes.get(image_id, (image.height, image.width))
        if None not in size and tuple(ids.shape) != size:
            report.record(
                Finding(
                    "panoptic_size_mismatch",
                    f"{where}: PNG {ids.shape[1]}x{ids.shape[0]}, image {image.file_name} "
                    f"{size[1]}x{size[0]} (width x height)",
                )
            )
        for finding in png_findings(ids, entry, where):
            report.record(finding)


def _check_image_files(
    report: Report, index: CocoIndex, decode: bool, masks: bool = False
) -> dict[int, tuple[int, int]]:
    """Adds the findings of the images' files; returns the size (height, width) of each image
    read."""
    sizes: dict[int, tuple[int, int]] = {}
    if not report.images_dir.is_dir():
        report.record(Finding("no_images_dir", str(report.images_dir)))
        return sizes
    for image_id, entry in index.images.items():
        if entry.file_name is None:  # malformed or unsafe: reported already
            continue
        where = f"{entry.file_name} (image id {image_id})"
        findings = image_file_findings(report.images_dir, entry.file_name, where)
        for finding in findings:
            report.record(finding)
        if any(finding.severity == "error" for finding in findings):
            continue
        path = report.images_dir / entry.file_name
        try:
            if decode:
                height, width = read_image(path).shape[-2:]
            else:
                with Image.open(path) as pil:
                    width, height = pil.size
        except Exception as error:  # Pillow signals broken files with many exception types
            report.record(Finding("unreadable_image", f"{where}: {error}"))
            continue
        sizes[image_id] = (height, width)
        listed = (entry.height, entry.width)
        if None not in listed and listed != (height, width):
            # Masks are decoded at the JSON's size: they would not cover the image.
            override, note = ("error", _MASKS_SIZE) if masks else (None, "")
            report.record(
                Finding(
                    "image_size_mismatch",
                    f"{where}: JSON {listed[1]}x{listed[0]}, file {width}x{height} "
                    "(width x height)",
                    override,
                    note,
                )
            )
    return sizes


_MASKS_SIZE = "an error for masks, which would not cover their image: masks=True refuses them"
