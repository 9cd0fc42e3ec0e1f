"""Checking a COCO-format dataset before training on it: every problem, counted, with examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from detrkit.data.coco import read_coco_json, read_image
from detrkit.data.validate import CocoIndex, Finding, Severity, image_file_findings, validate_coco

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

    The file goes through the rules :class:`~detrkit.data.CocoDetection` applies
    (:func:`~detrkit.data.validate.validate_coco`): every error reported here is one the loader
    refuses the file for, every warning something it leaves out or clips. The report is also an
    error where no object could be trained on, and where listed image files are missing, not
    files or cannot be decoded (evaluation refuses those; training skips them).
    ``decode_images=False`` only reads the image headers: much faster, but truncated files go
    unnoticed.
    """
    report = Report(Path(images_dir), Path(annotations_json))
    try:
        data = read_coco_json(annotations_json)
    except (OSError, ValueError) as error:
        report.record(Finding("invalid_annotations_file", str(error)))
        return report
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])

    index = validate_coco(data)
    for finding in index.findings:
        report.record(finding)
    reason = index.untrainable_reason()
    if reason is not None and index.images:
        report.record(Finding("not_trainable", reason))
    _check_image_files(report, index, decode_images)
    return report


def _check_image_files(report: Report, index: CocoIndex, decode: bool) -> None:
    if not report.images_dir.is_dir():
        report.record(Finding("no_images_dir", str(report.images_dir)))
        return
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
        listed = (entry.height, entry.width)
        if None not in listed and listed != (height, width):
            report.record(
                Finding(
                    "image_size_mismatch",
                    f"{where}: JSON {listed[1]}x{listed[0]}, file {width}x{height} "
                    "(width x height)",
                )
            )
