"""The rules of a COCO instances file, in one place.

:class:`~detrkit.data.CocoDetection` refuses a file with any *error* found here and leaves out
what the *warnings* point at; :func:`~detrkit.data.check_dataset` reports every finding. Both read
the file through :func:`validate_coco`, so what ``detrkit data check`` calls usable is what
training and evaluation accept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]

_INT64 = 2**63

# Every kind of finding: its severity and what `detrkit data check` prints for it.
KINDS: dict[str, tuple[Severity, str]] = {
    "invalid_annotations_file": ("error", "annotations file unusable"),
    "malformed_image": ("error", "images entries with a field missing, null or of a wrong type"),
    "unsafe_file_name": (
        "error",
        "file names reaching outside the images folder ('..' or an absolute path; refused)",
    ),
    "duplicate_image_id": ("error", "images entries repeating an earlier id"),
    "malformed_category": (
        "error",
        "categories entries with a field missing, null or of a wrong type",
    ),
    "duplicate_category_id": ("error", "categories entries repeating an earlier id"),
    "malformed_annotation": (
        "error",
        "annotations with a field missing, null or of a wrong type",
    ),
    "negative_box_size": ("error", "boxes of negative width or height (is it [x, y, w, h]?)"),
    # Instance masks (the objects' segmentation), read by CocoDetection(masks=True); without
    # masks they are warnings (see validate_coco).
    "missing_segmentation": ("error", "objects without a 'segmentation' (their mask)"),
    "malformed_segmentation": (
        "error",
        "segmentations that are neither polygons (a list of lists) nor an RLE object",
    ),
    "malformed_polygon": (
        "error",
        "polygons that are not x, y pairs of numbers, or have fewer than 3 points",
    ),
    "malformed_rle": (
        "error",
        "RLE masks that do not decode: size not [height, width], counts not run lengths "
        "covering the image",
    ),
    "segmentation_size_mismatch": (
        "error",
        "RLE masks whose size is not their image's height and width",
    ),
    "duplicate_annotation_id": (
        "error",
        "annotations repeating an earlier id (COCO evaluation would mix them up)",
    ),
    "unknown_image_id": ("error", "annotations of an image id that no images entry has"),
    "unknown_category_id": ("error", "annotations of a category id that no category has"),
    "no_images": ("error", "the file lists no image"),
    "no_categories": ("error", "the file lists no category"),
    "not_trainable": (
        "error",
        "no usable object in the whole file: it cannot be trained on (evaluating on it is "
        "possible: images without objects are fine there)",
    ),
    "crowd_annotation": (
        "warning",
        "crowd annotations (iscrowd 1): left out of the training targets; evaluation ignores "
        "detections on them",
    ),
    "empty_box": ("warning", "boxes of zero width or height (left out)"),
    "box_outside_image": ("warning", "boxes reaching outside their image (clipped to it)"),
    "box_off_image": ("warning", "boxes wholly outside their image (left out)"),
    "image_without_annotations": (
        "warning",
        "images with no usable object: trained on as background only",
    ),
    # COCO's panoptic format (detrkit.data.panoptic): its JSON, then its PNGs, which only
    # check_panoptic and the reading of an item look at.
    "malformed_panoptic_annotation": (
        "error",
        "panoptic annotations or segments with a field missing, null or of a wrong type",
    ),
    "duplicate_panoptic_annotation": ("error", "images with more than one panoptic annotation"),
    "duplicate_segment_id": ("error", "segments repeating an earlier id of their image"),
    "missing_panoptic_annotation": (
        "warning",
        "images without a panoptic annotation (left out of the panoptic dataset)",
    ),
    "no_panoptic_dir": ("error", "the folder of the panoptic PNGs does not exist"),
    "missing_panoptic_png": ("error", "panoptic PNGs that do not exist"),
    "unreadable_panoptic_png": ("error", "panoptic PNGs that cannot be decoded"),
    "panoptic_size_mismatch": ("error", "panoptic PNGs whose size is not their image's"),
    "unlisted_segment_id": (
        "error",
        "segment ids in a PNG that its annotation's segments_info does not list",
    ),
    "segment_without_pixels": (
        "warning",
        "segments listed in segments_info with no pixel in their PNG (left out)",
    ),
    # Pascal VOC and YOLO files (detrkit.data.voc, detrkit.data.yolo), found while they are
    # turned into COCO instances; the COCO rules above then apply to what they describe.
    "invalid_data_yaml": (
        "error",
        "YOLO data.yaml unusable: not YAML, or 'names', 'train' or 'val' missing or malformed",
    ),
    "missing_split": (
        "error",
        "splits that are not there (VOC's ImageSets/Main/SPLIT.txt, YOLO's image folders or lists)",
    ),
    "malformed_xml": (
        "error",
        "VOC annotation files that are not XML, lack a tag or hold a bad value (the object left "
        "out)",
    ),
    "missing_xml": ("error", "images of a VOC split without their Annotations/ID.xml"),
    "malformed_label_line": (
        "error",
        "YOLO label lines that are not 'class cx cy w h', 5 numbers (the line left out)",
    ),
    "class_id_out_of_range": (
        "error",
        "YOLO class ids that data.yaml's names do not name (the line left out)",
    ),
    "coordinates_out_of_range": (
        "error",
        "YOLO coordinates outside [0, 1]: pixels instead of normalised? (the line left out)",
    ),
    "label_without_image": (
        "warning",
        "YOLO label files without an image of the same name (ignored)",
    ),
    "image_without_label": (
        "warning",
        "YOLO images without a label file (trained on as background)",
    ),
    # The image files, which only check_dataset and the reading of an item look at.
    "no_images_dir": ("error", "the images folder does not exist"),
    "missing_image_file": (
        "error",
        "listed image files that do not exist (evaluation refuses the dataset; training skips "
        "them)",
    ),
    "image_not_a_file": (
        "error",
        "listed image paths that are folders or other non-files (evaluation refuses the "
        "dataset; training skips them)",
    ),
    "unreadable_image": (
        "error",
        "image files that cannot be decoded, truncated or not images (evaluation stops at "
        "them; training skips them)",
    ),
    "image_symlink_outside": (
        "warning",
        "image files that are symlinks to outside the images folder (read all the same)",
    ),
    "image_size_mismatch": (
        "warning",
        "images whose size differs from the JSON's width/height (boxes may be off)",
    ),
}

# What the loader leaves out of the targets (it says so once, counted, when it is built).
LEFT_OUT = ("crowd_annotation", "empty_box", "box_off_image")


class CocoFormatError(ValueError):
    """A COCO instances file that breaks a rule; the message names the file, the entry, the
    field and the problem."""


@dataclass(frozen=True)
class Finding:
    """One problem at one place: ``detail`` names the entry and field, e.g.
    ``"annotations[3] has bbox null; expected [x, y, w, h], 4 finite numbers"``."""

    kind: str
    detail: str
    # Where the severity depends on what reads the data (instance masks are errors only for a
    # loader that decodes them): the severity in place of the kind's, and what the report adds
    # to the kind's description to say why.
    override: Severity | None = None
    note: str = ""

    @property
    def severity(self) -> Severity:
        return self.override or KINDS[self.kind][0]

    @property
    def description(self) -> str:
        description = KINDS[self.kind][1]
        return f"{description} ({self.note})" if self.note else description


@dataclass
class ImageEntry:
    """An images entry with a valid, unrepeated id (other fields None where malformed)."""

    file_name: str | None
    width: int | None
    height: int | None


@dataclass
class CocoObject:
    """A non-crowd annotation of non-zero size: what the loader puts in the targets (clipped to
    the image it is read from). ``segmentation`` is the annotation's as the JSON has it (None
    where it has none), read when masks are asked for."""

    xywh: list[float]
    category_id: int
    area: float
    annotation_id: int = 0
    segmentation: Any = None


@dataclass
class CocoIndex:
    """What :func:`validate_coco` found: the valid entries and every finding, in file order."""

    images: dict[int, ImageEntry] = field(default_factory=dict)
    categories: dict[int, str] = field(default_factory=dict)
    objects: dict[int, list[CocoObject]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # Whether the segmentation rules are errors (a loader that decodes the masks) or warnings.
    masks: bool = False
    # Objects inside their image as the JSON sizes it: what training learns from.
    usable_objects: int = 0
    annotated: set[int] = field(default_factory=set)  # ids of images with a usable object

    def add(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(kind, detail))

    def add_segmentation(self, kind: str, detail: str) -> None:
        """A finding of the segmentation rules: an error for a loader that decodes the masks,
        a warning for one reading boxes only."""
        if self.masks:
            self.add(kind, detail)
        else:
            self.findings.append(Finding(kind, detail, "warning", _BOXES_ONLY))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def raise_errors(self, path: str | Path) -> None:
        """Raises :class:`CocoFormatError` for the first error (counting the others)."""
        errors = self.errors
        if errors:
            more = len(errors) - 1
            problems = "problem" if more == 1 else "problems"
            also = f" (and {more} more {problems}: `detrkit data check` lists them)" if more else ""
            raise CocoFormatError(f"{path}: {errors[0].detail}{also}")

    def left_out_counts(self) -> dict[str, int]:
        """How many annotations of each kind in :data:`LEFT_OUT` the loader leaves out."""
        counts = dict.fromkeys(LEFT_OUT, 0)
        for finding in self.findings:
            if finding.kind in counts:
                counts[finding.kind] += 1
        return counts

    def untrainable_reason(self) -> str | None:
        """Why no training step could learn from this file, or None when some object can."""
        if self.usable_objects:
            return None
        left_out = self.left_out_counts()
        if not any(left_out.values()):
            return "no annotation to train on"
        crowd, empty, off = left_out.values()
        return (
            f"no usable object to train on (left out: {crowd} crowd annotations, {empty} boxes "
            f"of zero size, {off} boxes outside their image)"
        )


def shown_value(value: Any) -> str:
    """A value as the JSON file spells it (null, "60", NaN), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_xywh(bbox: Any) -> bool:
    """Whether ``bbox`` is a COCO box as this reader takes it: a list of 4 finite numbers."""
    return isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)


# The type rule of every field the loader reads: (test, what is expected).
_IMAGE_FIELDS = {
    "id": (_is_int, "an integer"),
    "file_name": (lambda v: isinstance(v, str) and v != "" and "\0" not in v, "a file name"),
    "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
}
_CATEGORY_FIELDS = {
    "id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "name": (lambda v: isinstance(v, str), "a string"),
}
_ANNOTATION_FIELDS = {
    # COCOeval takes a ground-truth id of 0 for "matched to nothing".
    "id": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "image_id": (_is_int, "an integer"),
    "category_id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "bbox": (is_xywh, "[x, y, w, h], 4 finite numbers"),
    # Both read by COCOeval on the same file, which stops with a KeyError where they are missing.
    "area": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "iscrowd": (lambda v: _is_int(v) and v in (0, 1), "0 or 1"),
}

FIELDS = {
    "images": _IMAGE_FIELDS,
    "categories": _CATEGORY_FIELDS,
    "annotations": _ANNOTATION_FIELDS,
}


def _field_problems(entry: Any, section: str, i: int) -> list[str]:
    """What is wrong with the fields of ``section[i]``, one line per field."""
    return field_problems(entry, f"{section}[{i}]", FIELDS[section])


def field_problems(
    entry: Any, where: str, rules: dict[str, tuple[Callable[[Any], bool], str]]
) -> list[str]:
    """What is wrong with the fields of the entry at ``where`` under ``rules`` (field name:
    (test, what is expected)), one line per field."""
    if not isinstance(entry, dict):
        return [f"{where} is {shown_value(entry)}; expected an object"]
    problems = []
    for name, (valid, expected) in rules.items():
        if name not in entry:
            problems.append(f"{where} has no {name!r}; expected {expected}")
        elif not valid(entry[name]):
            problems.append(f"{where} has {name} {shown_value(entry[name])}; expected {expected}")
    return problems


def outside_reason(file_name: str) -> str | None:
    """Why the file name points outside the images folder (None if it stays inside):
    subfolders are fine, ``..`` and absolute paths (POSIX or Windows) are not."""
    if file_name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", file_name):
        return "an absolute path"
    # Backslashes too: they separate folders on Windows.
    if ".." in re.split(r"[\\/]", file_name):
        return "a '..' step"
    return None


def validate_coco(data: dict[str, Any], masks: bool = False) -> CocoIndex:
    """Applies every rule to a parsed instances file (as :func:`read_coco_json` returns it).

    Never raises for problems in the data: they are the index's findings, errors and warnings.
    ``masks``: the rules of a loader that decodes each object's mask (``CocoDetection(...,
    masks=True)``): every object needs a ``segmentation`` that decodes at its image's size.
    Without it, a segmentation that is there and would not decode is a warning (box training
    never reads it) and a missing one is fine.
    """
    index = CocoIndex(masks=masks)
    _index_categories(index, data["categories"])
    _index_images(index, data["images"])
    _index_annotations(index, data["annotations"])
    for image_id, entry in index.images.items():
        if image_id not in index.annotated:
            name = f"{entry.file_name} " if entry.file_name else ""
            index.add("image_without_annotations", f"{name}(image id {image_id})")
    return index


def _index_categories(index: CocoIndex, categories: list[Any]) -> None:
    first: dict[int, int] = {}
    for i, category in enumerate(categories):
        problems = _field_problems(category, "categories", i)
        for problem in problems:
            index.add("malformed_category", problem)
        category_id = category.get("id") if isinstance(category, dict) else None
        if not _CATEGORY_FIELDS["id"][0](category_id):
            continue
        if category_id in first:
            index.add(
                "duplicate_category_id",
                f"categories[{i}] has id {category_id}, like categories[{first[category_id]}]",
            )
            continue
        first[category_id] = i
        name = category.get("name")
        index.categories[category_id] = name if isinstance(name, str) else str(category_id)
    if not categories:
        index.add("no_categories", "'categories' is empty")


def _index_images(index: CocoIndex, images: list[Any]) -> None:
    first: dict[int, int] = {}
    for i, image in enumerate(images):
        for problem in _field_problems(image, "images", i):
            index.add("malformed_image", problem)
        if not isinstance(image, dict):
            continue
        file_name = image.get("file_name")
        if not _IMAGE_FIELDS["file_name"][0](file_name):
            file_name = None
        elif (reason := outside_reason(file_name)) is not None:
            index.add(
                "unsafe_file_name",
                f"images[{i}] has file_name {shown_value(file_name)}, which leads outside the "
                f"images folder ({reason}); expected a path inside it",
            )
            file_name = None
        image_id = image.get("id")
        if not _is_int(image_id):
            continue
        if image_id in first:
            index.add(
                "duplicate_image_id",
                f"images[{i}] has id {image_id}, like images[{first[image_id]}]",
            )
            continue
        first[image_id] = i
        width, height = (
            image.get(name) if _IMAGE_FIELDS[name][0](image.get(name)) else None
            for name in ("width", "height")
        )
        index.images[image_id] = ImageEntry(file_name, width, height)
        index.objects[image_id] = []
    if not images:
        index.add("no_images", "'images' is empty")


def _index_annotations(index: CocoIndex, annotations: list[Any]) -> None:
    first: dict[int, int] = {}
    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        problems = _field_problems(annotation, "annotations", i)
        for problem in problems:
            index.add("malformed_annotation", problem)
        if not isinstance(annotation, dict):
            continue
        annotation_id = annotation.get("id")
        if _ANNOTATION_FIELDS["id"][0](annotation_id):
            if annotation_id in first:
                index.add(
                    "duplicate_annotation_id",
                    f"{where} has id {annotation_id}, like annotations[{first[annotation_id]}]",
                )
            else:
                first[annotation_id] = i
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        if _is_int(image_id) and image_id not in index.images:
            index.add("unknown_image_id", f"{where} has image_id {image_id}, which no image has")
        if _is_int(category_id) and category_id not in index.categories:
            index.add(
                "unknown_category_id",
                f"{where} has category_id {category_id}, which no category has",
            )
        if problems:
            continue
        bbox = annotation["bbox"]
        x, y, w, h = bbox
        if w < 0 or h < 0:
            index.add("negative_box_size", f"{where} has bbox {shown_value(bbox)}: negative size")
            continue
        image = index.images.get(image_id)
        if image is None or category_id not in index.categories:
            continue
        described = f"{where} (image id {image_id}): bbox {shown_value(bbox)}"
        if annotation["iscrowd"]:
            index.add("crowd_annotation", f"{where} (image id {image_id})")
            continue
        if w == 0 or h == 0:
            index.add("empty_box", described)
            continue
        segmentation = annotation.get("segmentation")
        _check_segmentation(index, annotation, where, image)
        index.objects[image_id].append(
            CocoObject(
                [float(v) for v in bbox],
                category_id,
                float(annotation["area"]),
                annotation["id"],
                segmentation,
            )
        )
        if image.width is None or image.height is None:
            continue
        # The loader clips to the image and drops what is left empty: the same test here.
        if min(x + w, image.width) <= max(x, 0) or min(y + h, image.height) <= max(y, 0):
            index.add("box_off_image", f"{described} in {image.width}x{image.height}")
            continue
        if x < 0 or y < 0 or x + w > image.width or y + h > image.height:
            index.add("box_outside_image", f"{described} in {image.width}x{image.height}")
        index.usable_objects += 1
        index.annotated.add(image_id)


_BOXES_ONLY = "ignored when reading boxes only; an error for a loader of masks, `--masks`"


def _check_segmentation(
    index: CocoIndex, annotation: dict[str, Any], where: str, image: ImageEntry
) -> None:
    """Adds the findings of an object's segmentation: missing (only for a loader of masks),
    or one that would not decode at its image's size."""
    where = f"{where} (id {annotation['id']}, image id {annotation['image_id']})"
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        if index.masks:
            had = "null" if "segmentation" in annotation else "no 'segmentation'"
            index.add(
                "missing_segmentation",
                f"{where} has {had}; reading masks needs every object's polygons or RLE",
            )
        return
    size = None if image.height is None or image.width is None else (image.height, image.width)
    problem = segmentation_problem(segmentation, size)
    if problem is not None:
        kind, detail = problem
        index.add_segmentation(kind, f"{where}: {detail}")


def segmentation_problem(segmentation: Any, size: tuple[int, int] | None) -> tuple[str, str] | None:
    """Why a COCO ``segmentation`` would not decode into a mask of ``size`` (height, width; None
    when unknown), as ``(kind, detail)``; None when it decodes. Polygons are a list of
    ``[x1, y1, x2, y2, ...]`` lists of at least 3 points; an RLE is ``{"size": [height, width],
    "counts": ...}``, counts a list of run lengths (uncompressed) or COCO's compressed string,
    the runs adding up to height * width."""
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, size)
    return (
        "malformed_segmentation",
        f"segmentation {shown_value(segmentation)}; expected polygons [[x1, y1, x2, y2, ...], "
        '...] or an RLE {"size": [height, width], "counts": ...}',
    )


def _polygon_problem(polygons: list[Any]) -> tuple[str, str] | None:
    if not polygons:
        return "malformed_polygon", "segmentation [] has no polygon"
    for k, polygon in enumerate(polygons):
        if not isinstance(polygon, list):
            return (
                "malformed_polygon",
                f"segmentation[{k}] is {shown_value(polygon)}; expected a polygon "
                "[x1, y1, x2, y2, ...]",
            )
        for j, value in enumerate(polygon):
            if not _is_number(value):
                return (
                    "malformed_polygon",
                    f"segmentation[{k}][{j}] is {shown_value(value)}; expected a finite number",
                )
        if len(polygon) % 2:
            return (
                "malformed_polygon",
                f"segmentation[{k}] has {len(polygon)} coordinates, an odd number; expected "
                "x, y pairs",
            )
        if len(polygon) < 6:
            points = len(polygon) // 2
            return (
                "malformed_polygon",
                f"segmentation[{k}] has {points} point{'s' if points != 1 else ''}; a polygon "
                "needs at least 3",
            )
    return None


def _rle_problem(rle: dict[str, Any], size: tuple[int, int] | None) -> tuple[str, str] | None:
    rle_size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(rle_size, list)
        and len(rle_size) == 2
        and all(_is_int(v) for v in rle_size)
        and min(rle_size) > 0
    ):
        return (
            "malformed_rle",
            f"RLE size {shown_value(rle_size)}; expected [height, width], 2 positive integers",
        )
    height, width = rle_size
    if size is not None and tuple(rle_size) != size:
        return (
            "segmentation_size_mismatch",
            f"RLE size [{height}, {width}] (height, width) for an image of "
            f"[{size[0]}, {size[1]}] in the JSON",
        )
    if isinstance(counts, list):
        bad = next((v for v in counts if not (_is_int(v) and v >= 0)), None)
        if bad is not None:
            return (
                "malformed_rle",
                f"RLE counts hold {shown_value(bad)}; expected non-negative integers (run lengths)",
            )
        runs = counts
    elif isinstance(counts, str):
        runs = compressed_counts(counts)
        if isinstance(runs, str):
            return "malformed_rle", f"RLE counts {shown_value(counts)} do not decode: {runs}"
    else:
        return (
            "malformed_rle",
            f"RLE counts {shown_value(counts)}; expected a list of run lengths or COCO's "
            "compressed string",
        )
    total = sum(runs)
    if total != height * width:
        return (
            "malformed_rle",
            f"RLE counts cover {total} pixels, not height * width = {height * width}",
        )
    return None


def compressed_counts(counts: str) -> list[int] | str:
    """The run lengths of COCO's compressed RLE string, or why it does not decode.

    Each run is a little-endian base-32 number in characters '0' (48) to 'o' (111), bit 0x20 of
    a character saying more follow and bit 0x10 of the last the sign; from the third run on, the
    number is the difference from the run two before. pycocotools does not check any of this
    (and writes past its buffer on runs longer than the image), hence this reader.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return "it ends inside a number"
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return f"character {counts[position]!r} at {position} is outside '0'..'o'"
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # sign-extends the number
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return f"run {len(runs)} is negative ({value})"
        runs.append(value)
    return runs


def image_file_findings(images_dir: Path, file_name: str, label: str = "") -> list[Finding]:
    """What is wrong with a listed image's file short of decoding it: missing, not a file, or
    a symlink leading outside ``images_dir`` (a warning: it is read all the same). ``label``
    names the file in the findings (default: ``file_name``)."""
    label = label or file_name
    path = images_dir / file_name
    if not path.exists():
        how = "a symlink to nothing" if path.is_symlink() else "no such file"
        return [Finding("missing_image_file", f"{label}: {how}")]
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        return [Finding("image_not_a_file", f"{label}: {what}, not an image file")]
    if not path.resolve().is_relative_to(images_dir.resolve()):
        return [Finding("image_symlink_outside", f"{label}: a symlink to {path.resolve()}")]
    return []
