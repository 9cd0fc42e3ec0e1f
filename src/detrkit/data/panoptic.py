"""COCO's panoptic format: a JSON file of images, categories (things and stuff) and one annotation
per image, whose PNG gives every pixel its segment's id (R + 256 G + 256^2 B, 0 for void), and
the dataset that reads it.

The rules of the JSON and of the PNGs are here, in one place: :class:`CocoPanoptic` refuses what
breaks an error rule and :func:`~detrkit.data.check.check_panoptic` (``detrkit data check
--panoptic``) reports every finding, as for the instances files (:mod:`detrkit.data.validate`).

Scoring by panoptic quality: :meth:`CocoPanoptic.panoptic_target` (and
:meth:`DigitsDetection.panoptic_target <detrkit.data.DigitsDetection.panoptic_target>`) give the
ground truth as torchmetrics' ``PanopticQuality`` takes it, ``[H, W, 2]`` (category id, instance
id), with void pixels (id 0 in the PNG, and crowd segments) as category :data:`VOID` = -1.
torchmetrics maps every category of the target outside its ``things`` and ``stuffs``, -1 among
them, to its own void, whose pixels are scored as COCO's panoptic evaluation scores void: left
out of the IoUs, and a predicted segment lying mostly on them is no false positive. Predictions
with void pixels use -1 too, which needs ``PanopticQuality(..., allow_unknown_preds_category=
True)``; :func:`pq_categories` gives its ``things`` and ``stuffs``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from detrkit.data.coco import (
    CocoImages,
    ImageReadError,
    LabelMapping,
    read_coco_json,
    read_image,
)
from detrkit.data.transforms import SampleTransform, to_training_sample
from detrkit.data.validate import (
    CocoFormatError,
    CocoIndex,
    Finding,
    _index_categories,
    _index_images,
    _is_int,
    field_problems,
    outside_reason,
    shown_value,
)

VOID = -1  # the category of void pixels in panoptic_target (see the module's docstring)
MAX_SEGMENT_ID = 256**3 - 1  # the largest id a PNG's three channels hold

_CATEGORY_FIELDS = {
    "isthing": (lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1"),
}
_ANNOTATION_FIELDS = {
    "image_id": (_is_int, "an integer"),
    "file_name": (
        lambda v: isinstance(v, str) and v != "" and "\0" not in v,
        "the file name of its PNG",
    ),
    "segments_info": (lambda v: isinstance(v, list), "a list of segments"),
}
_SEGMENT_FIELDS = {
    "id": (
        lambda v: _is_int(v) and 0 < v <= MAX_SEGMENT_ID,
        f"an integer in 1..{MAX_SEGMENT_ID} (0 is void)",
    ),
    "category_id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
}
# Read where there, 0 where not (bbox and area are not read: see CocoPanoptic).
_OPTIONAL_SEGMENT_FIELDS = {"iscrowd": (lambda v: _is_int(v) and v in (0, 1), "0 or 1")}


@dataclass(frozen=True)
class Segment:
    """One entry of an annotation's ``segments_info``."""

    id: int
    category_id: int
    iscrowd: bool


@dataclass
class PanopticEntry:
    """One image's panoptic annotation: its PNG's file name and its segments, in file order."""

    file_name: str
    segments: list[Segment]


@dataclass
class PanopticIndex(CocoIndex):
    """What :func:`validate_panoptic` found: the valid images, categories (``things``: whether
    each category id is a thing) and annotations (per image id), and every finding."""

    things: dict[int, bool] = field(default_factory=dict)
    panoptic: dict[int, PanopticEntry] = field(default_factory=dict)


def default_panoptic_dir(panoptic_json: str | Path) -> Path:
    """Where COCO keeps a panoptic JSON's PNGs: its path without ``.json``
    (``annotations/panoptic_val2017.json`` -> ``annotations/panoptic_val2017/``)."""
    path = Path(panoptic_json)
    return path.with_suffix("") if path.suffix == ".json" else path.parent / (path.name + "_pngs")


def validate_panoptic(data: dict[str, Any]) -> PanopticIndex:
    """Applies the rules of the panoptic JSON to a parsed file (as
    :func:`~detrkit.data.read_coco_json` returns it); never raises for problems in the data.

    Images and categories follow the instances file's rules, categories also need ``isthing``
    (0 or 1). Each annotation needs ``image_id`` (of a listed image, one annotation per image),
    ``file_name`` (its PNG, inside the PNG folder) and ``segments_info``, whose segments need
    ``id`` (1 to 256^3 - 1, unrepeated in the image) and ``category_id`` (of a listed category);
    ``iscrowd``, where there, is 0 or 1. Images without an annotation are a warning.
    """
    index = PanopticIndex()
    _index_categories(index, data["categories"])
    for i, category in enumerate(data["categories"]):
        for problem in field_problems(category, f"categories[{i}]", _CATEGORY_FIELDS):
            if isinstance(category, dict):  # not an object: reported already
                index.add("malformed_category", problem)
        if isinstance(category, dict) and category.get("id") in index.categories:
            index.things.setdefault(category["id"], bool(category.get("isthing")))
    _index_images(index, data["images"])
    first: dict[int, int] = {}
    for i, annotation in enumerate(data["annotations"]):
        _index_annotation(index, annotation, i, first)
    for image_id, entry in index.images.items():
        if image_id not in index.panoptic and image_id not in first:
            name = f"{entry.file_name} " if entry.file_name else ""
            index.add("missing_panoptic_annotation", f"{name}(image id {image_id})")
    return index


def _index_annotation(index: PanopticIndex, annotation: Any, i: int, first: dict[int, int]) -> None:
    where = f"annotations[{i}]"
    problems = field_problems(annotation, where, _ANNOTATION_FIELDS)
    for problem in problems:
        index.add("malformed_panoptic_annotation", problem)
    if not isinstance(annotation, dict):
        return
    image_id, file_name = annotation.get("image_id"), annotation.get("file_name")
    if _is_int(image_id):
        where = f"{where} (image id {image_id})"
        if image_id not in index.images:
            index.add("unknown_image_id", f"{where} has image_id {image_id}, which no image has")
            problems.append("unknown image")
        elif image_id in first:
            index.add(
                "duplicate_panoptic_annotation",
                f"{where}: image id {image_id} has annotations[{first[image_id]}] already",
            )
            problems.append("repeated image")
        else:
            first[image_id] = i
    if isinstance(file_name, str) and (reason := outside_reason(file_name)) is not None:
        index.add(
            "unsafe_file_name",
            f"{where} has file_name {shown_value(file_name)}, which leads outside the PNG "
            f"folder ({reason}); expected a path inside it",
        )
        problems.append("unsafe file name")
    segments_info = annotation.get("segments_info")
    if not isinstance(segments_info, list):
        return
    segments, seen = [], {}
    for k, segment in enumerate(segments_info):
        segment_where = f"{where}.segments_info[{k}]"
        segment_problems = field_problems(segment, segment_where, _SEGMENT_FIELDS)
        if isinstance(segment, dict) and "iscrowd" in segment:
            segment_problems += field_problems(segment, segment_where, _OPTIONAL_SEGMENT_FIELDS)
        for problem in segment_problems:
            index.add("malformed_panoptic_annotation", problem)
        problems += segment_problems
        if segment_problems:
            continue
        segment_id, category_id = segment["id"], segment["category_id"]
        if segment_id in seen:
            index.add(
                "duplicate_segment_id",
                f"{segment_where} has id {segment_id}, like segments_info[{seen[segment_id]}]",
            )
            problems.append("repeated segment")
            continue
        seen[segment_id] = k
        if category_id not in index.categories:
            index.add(
                "unknown_category_id",
                f"{segment_where} has category_id {category_id}, which no category has",
            )
            problems.append("unknown category")
            continue
        segments.append(Segment(segment_id, category_id, bool(segment.get("iscrowd", 0))))
    if problems:
        return
    index.panoptic[image_id] = PanopticEntry(file_name, segments)
    # What training learns from: a non-crowd segment (with pixels, which the PNG tells).
    if any(not segment.iscrowd for segment in segments):
        index.usable_objects += 1
        index.annotated.add(image_id)


def segment_ids(png: Tensor) -> Tensor:
    """A panoptic PNG's pixels ``[3, H, W]`` ``uint8`` as segment ids ``[H, W]`` ``int64``:
    R + 256 G + 256^2 B."""
    channels = png.to(torch.int64)
    return channels[0] + 256 * channels[1] + 256**2 * channels[2]


def read_segment_ids(path: str | Path) -> Tensor:
    """The segment ids ``[H, W]`` of a panoptic PNG; raises :class:`ImageReadError` naming the
    file when it is missing or cannot be decoded."""
    return segment_ids(read_image(path))


def png_findings(ids: Tensor, entry: PanopticEntry, where: str) -> list[Finding]:
    """What is wrong between a PNG's segment ids and its annotation: ids the annotation does not
    list (errors: their pixels belong to nothing) and listed segments without pixels (warnings:
    left out). ``where`` names the PNG in the findings."""
    present = set(torch.unique(ids).tolist()) - {0}
    listed = {segment.id for segment in entry.segments}
    findings = []
    unlisted = sorted(present - listed)
    if unlisted:
        shown = ", ".join(str(v) for v in unlisted[:5]) + (", ..." if len(unlisted) > 5 else "")
        findings.append(
            Finding(
                "unlisted_segment_id",
                f"{where}: ids {shown} ({len(unlisted)} in all) are in the PNG but not in its "
                "segments_info",
            )
        )
    for k, segment in enumerate(entry.segments):
        if segment.id not in present:
            findings.append(
                Finding(
                    "segment_without_pixels",
                    f"{where}: segments_info[{k}] (id {segment.id}) has no pixel in the PNG",
                )
            )
    return findings


def pq_categories(dataset: Any) -> tuple[set[int], set[int]]:
    """The category ids of a dataset's things and of its stuff (from ``category_ids`` and
    ``is_thing``), as :class:`~detrkit.engine.evaluate.PanopticScore` (and torchmetrics'
    ``PanopticQuality``) take them, for scoring against its ``panoptic_target``."""
    pairs = list(zip(dataset.category_ids, dataset.is_thing))
    return {c for c, thing in pairs if thing}, {c for c, thing in pairs if not thing}


class CocoPanoptic(CocoImages):
    """A panoptic segmentation dataset in COCO's panoptic format: ``images_dir`` holds the images,
    ``panoptic_json`` lists them, the categories (``isthing``) and each image's annotation, a PNG
    in ``panoptic_dir`` (default: the JSON's path without ``.json``, COCO's layout:
    ``annotations/panoptic_val2017.json`` and ``annotations/panoptic_val2017/``) and its
    ``segments_info``.

    Items are ``(image, target)`` as :class:`~detrkit.data.CocoDetection`'s with ``masks=True``:
    one object per segment, in ``segments_info``'s order, with ``masks`` (its pixels in the PNG),
    ``boxes``, ``labels``, ``area`` (its number of pixels), ``iscrowd`` (0), ``image_id``,
    ``orig_size`` and ``size``. The boxes are the tight boxes of the masks, not the JSON's
    ``bbox``: the mask is the segment, so box and mask always agree (through the augmentations
    too), whatever rounding or staleness the ``bbox`` field has; the JSON's ``bbox`` and
    ``area`` are not read. Crowd segments and segments with no pixel are left out of the
    targets (crowd pixels are void in :meth:`panoptic_target`).

    Labels follow ``label_mapping`` as in CocoDetection; ``is_thing`` (per label) is the
    categories' ``isthing``. Only images with an annotation are items (one warning counts those
    without).

    A JSON breaking a rule of :func:`validate_panoptic` raises
    :class:`~detrkit.data.CocoFormatError` naming the file, the entry and the field; a missing
    PNG folder or PNG raises :class:`~detrkit.data.ImageReadError` at construction. When an item
    is read, a PNG that does not decode, whose size is not its image's, or with ids that its
    ``segments_info`` does not list raises naming the PNG. Unreadable images raise too, unless
    ``skip_unreadable`` (then skipped as CocoDetection skips them).
    """

    def __init__(
        self,
        images_dir: str | Path,
        panoptic_json: str | Path,
        panoptic_dir: str | Path | None = None,
        transforms: SampleTransform | None = None,
        label_mapping: LabelMapping = "contiguous",
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__(images_dir, transforms, label_mapping, skip_unreadable)
        self.panoptic_json = Path(panoptic_json)
        self.panoptic_dir = Path(
            default_panoptic_dir(panoptic_json) if panoptic_dir is None else panoptic_dir
        )
        index = validate_panoptic(read_coco_json(self.panoptic_json, what="panoptic"))
        index.raise_errors(self.panoptic_json)
        without = sum(f.kind == "missing_panoptic_annotation" for f in index.findings)
        if without:
            warnings.warn(
                f"{self.panoptic_json}: {without} images without a panoptic annotation left out "
                "(`detrkit data check --panoptic` lists them)",
                stacklevel=2,
            )
        self._set_labels(index.categories, index.things)
        self.image_ids = sorted(index.panoptic)
        self._files = [index.images[i].file_name for i in self.image_ids]
        self._pngs = [index.panoptic[i].file_name for i in self.image_ids]
        self._segments = [index.panoptic[i].segments for i in self.image_ids]
        if not self.panoptic_dir.is_dir():
            raise ImageReadError(
                f"{self.panoptic_dir}: no such folder, for the PNGs of {self.panoptic_json} "
                "(pass panoptic_dir where they are)"
            )
        missing = [name for name in self._pngs if not (self.panoptic_dir / name).is_file()]
        if missing:
            raise ImageReadError(
                f"{self.panoptic_dir}: {len(missing)} of the {len(self)} PNGs listed in "
                f"{self.panoptic_json} are not there, e.g. {', '.join(missing[:3])}"
            )
        if not self.skip_unreadable:
            self._missing_files_error(self.panoptic_json)

    def _segment_ids(self, position: int, size: tuple[int, int] | None = None) -> Tensor:
        """The PNG's segment ids ``[H, W]``, checked against its annotation (and the image's
        ``size``); raises CocoFormatError naming the PNG."""
        path = self.panoptic_dir / self._pngs[position]
        ids = read_segment_ids(path)
        if size is not None and tuple(ids.shape) != size:
            image = self.images_dir / self._files[position]
            raise CocoFormatError(
                f"{self.panoptic_json}: PNG {path} is {ids.shape[1]}x{ids.shape[0]} (width x "
                f"height), its image {image} {size[1]}x{size[0]}"
            )
        entry = PanopticEntry(self._pngs[position], self._segments[position])
        for finding in png_findings(ids, entry, str(path)):
            if finding.severity == "error":
                raise CocoFormatError(f"{self.panoptic_json}: {finding.detail}")
        return ids

    def _sample(self, position: int, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        height, width = image.shape[-2:]
        ids = self._segment_ids(position, (height, width))
        masks, labels = [], []
        for segment in self._segments[position]:
            mask = ids == segment.id
            if segment.iscrowd or not mask.any():
                continue
            masks.append(mask)
            labels.append(self._label_of[segment.category_id])
        stacked = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool)
        boxes = masks_to_boxes(stacked)  # [N, 4] the first and last pixel's indices
        boxes[:, 2:] += 1  # -> the pixels' outer edges, as tight boxes
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(self.image_ids[position]),
            "orig_size": torch.tensor([height, width]),
            "area": stacked.sum(dim=(1, 2)).to(torch.float32),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "masks": tv_tensors.Mask(stacked),
        }
        return to_training_sample(tv_tensors.Image(image), target, self.transforms)

    def panoptic_target(self, index: int) -> Tensor:
        """Item ``index``'s ground truth for panoptic quality, ``[H, W, 2]`` ``int64`` at the
        original size: each pixel's (category id, segment id), the JSON's ids (not the labels);
        (:data:`VOID`, 0) where the PNG has 0 or a crowd segment (see the module's docstring).
        Reads only the PNG."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        position = index % len(self)
        ids = self._segment_ids(position)
        target = torch.zeros(*ids.shape, 2, dtype=torch.int64)
        target[..., 0] = VOID
        for segment in self._segments[position]:
            if not segment.iscrowd:
                target[ids == segment.id] = torch.tensor([segment.category_id, segment.id])
        return target


def panoptic_target_of(
    masks: Sequence[Tensor] | Tensor, category_ids: Sequence[int], size: tuple[int, int]
) -> Tensor:
    """``[H, W, 2]`` (category id, segment id) of non-overlapping segment masks, the segments
    numbered from 1 in order, (:data:`VOID`, 0) where no mask is."""
    target = torch.zeros(*size, 2, dtype=torch.int64)
    target[..., 0] = VOID
    for segment_id, (mask, category_id) in enumerate(zip(masks, category_ids), start=1):
        target[torch.as_tensor(mask)] = torch.tensor([int(category_id), segment_id])
    return target
