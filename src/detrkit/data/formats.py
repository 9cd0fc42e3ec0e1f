"""Pascal VOC and YOLO datasets, read as the COCO instances they describe.

``voc:ROOT`` and ``yolo:DATA_YAML`` name such a dataset wherever a data string is taken
(``detrkit train --data``, ``detrkit eval --data``, ``detrkit data check``). Each split is turned
into an in-memory COCO instances dict (:class:`Converted`, by :func:`~detrkit.data.voc.read_voc`
and :func:`~detrkit.data.yolo.read_yolo`), which :class:`~detrkit.data.CocoDetection` then reads
like a JSON file: every rule of :mod:`detrkit.data.validate`, the crowd handling, the label
mapping and ``detrkit data check``'s report are the COCO ones. What only the format can get
wrong (malformed XML or label lines, class ids outside the names, label files without images)
is found while converting, as findings of the same kinds of report, naming the file and line;
the COCO rules' findings name the file and line their annotation came from.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detrkit.data.coco import CocoDetection, LabelMapping
from detrkit.data.transforms import SampleTransform
from detrkit.data.validate import KINDS, CocoFormatError, Finding, validate_coco

FORMAT_PREFIXES = ("voc:", "yolo:")
SPLITS = ("train", "val")

# Findings about image files: a training set skips those images (as for COCO files), an
# evaluation set refuses them.
FILE_KINDS = ("missing_image_file", "image_not_a_file", "unreadable_image")

_PLACE = re.compile(r"\b(annotations|images)\[(\d+)\]")


def is_format_data(data: str) -> bool:
    """Whether ``data`` is ``voc:ROOT`` or ``yolo:DATA_YAML``."""
    return data.startswith(FORMAT_PREFIXES)


def format_path(data: str) -> tuple[str, Path]:
    """The format (``"voc"`` or ``"yolo"``) and path of ``data``; ValueError for other forms
    and an empty path."""
    prefix = next((p for p in FORMAT_PREFIXES if data.startswith(p)), None)
    if prefix is None:
        raise ValueError(f"data {data!r}: expected voc:ROOT or yolo:DATA_YAML")
    path = data.removeprefix(prefix)
    if not path:
        what = "ROOT (the VOC folder)" if prefix == "voc:" else "DATA_YAML (the data.yaml file)"
        raise ValueError(f"data {data!r}: {prefix} needs a path, {prefix}{what}")
    return prefix[:-1], Path(path)


@dataclass
class Converted:
    """One split of a VOC or YOLO dataset as COCO instances.

    ``coco`` has the JSON file's ``images``, ``annotations`` and ``categories`` lists; file
    names are relative to ``images_dir``. ``source`` names the split in messages (VOC's split
    list, YOLO's image folder or data.yaml). ``findings`` are the format's own problems;
    ``places`` say where each image and annotation came from (file, and line for YOLO), to
    name them in the COCO rules' findings."""

    coco: dict[str, Any]
    images_dir: Path
    source: Path
    findings: list[Finding] = field(default_factory=list)
    image_places: list[str] = field(default_factory=list)
    annotation_places: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str) -> None:
        self.findings.append(Finding(kind, detail))

    def located(self, finding: Finding) -> Finding:
        """The finding with ``annotations[i]`` and ``images[i]`` replaced by where they came
        from."""

        def place(match: re.Match[str]) -> str:
            places = self.annotation_places if match[1] == "annotations" else self.image_places
            i = int(match[2])
            return places[i] if i < len(places) else match[0]

        detail = _PLACE.sub(place, finding.detail)
        return Finding(finding.kind, detail, finding.override, finding.note)

    def all_findings(self, masks: bool = False) -> list[Finding]:
        """The format's findings, then those of the COCO rules (located)."""
        index = validate_coco(self.coco, masks=masks)
        return self.findings + [self.located(finding) for finding in index.findings]

    def raise_errors(self, masks: bool = False, files: bool = True) -> None:
        """Raises :class:`CocoFormatError` for the first error, naming ``source`` and counting
        the others. ``files=False``: image files that cannot be read are no error (a training
        set skips them), only warned about."""
        findings = self.all_findings(masks)
        errors = [
            finding
            for finding in findings
            if finding.severity == "error" and (files or finding.kind not in FILE_KINDS)
        ]
        if errors:
            more = len(errors) - 1
            problems = "problem" if more == 1 else "problems"
            also = f" (and {more} more {problems}: `detrkit data check` lists them)" if more else ""
            detail = errors[0].detail
            # A detail naming the source itself (a missing split list) is not prefixed again.
            prefix = "" if detail.startswith(str(self.source)) else f"{self.source}: "
            raise CocoFormatError(f"{prefix}{detail}{also}")
        counts = Counter(
            finding.kind
            for finding in self.findings
            if finding.kind in FILE_KINDS or finding.severity == "warning"
        )
        if counts:
            listed = ", ".join(f"{count} {KINDS[kind][1]}" for kind, count in counts.items())
            warnings.warn(
                f"{self.source}: {listed} (`detrkit data check` lists them)", stacklevel=3
            )


def read_split(data: str, split: str) -> Converted:
    """The ``split`` (``"train"`` or ``"val"``) of ``voc:ROOT`` or ``yolo:DATA_YAML`` as COCO
    instances; never raises for problems in the data (they are the findings)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, path = format_path(data)
    if kind == "voc":
        from detrkit.data.voc import read_voc

        return read_voc(path, split)
    from detrkit.data.yolo import read_yolo

    return read_yolo(path, split)


def format_dataset(
    data: str,
    split: str,
    transforms: SampleTransform | None = None,
    label_mapping: LabelMapping = "contiguous",
    skip_unreadable: bool = True,
    masks: bool = False,
) -> CocoDetection:
    """The ``split`` of ``voc:ROOT`` or ``yolo:DATA_YAML`` as a :class:`CocoDetection` (its
    ``coco`` attribute the converted instances). Raises :class:`CocoFormatError` naming the file
    (and line) of the first error; image files that cannot be read are refused only without
    ``skip_unreadable`` (an evaluation set), as for COCO files."""
    converted = read_split(data, split)
    converted.raise_errors(masks, files=not skip_unreadable)
    return CocoDetection(
        converted.images_dir,
        converted.source,
        transforms,
        label_mapping=label_mapping,
        skip_unreadable=skip_unreadable,
        masks=masks,
        coco=converted.coco,
    )


def new_coco(categories: dict[int, str]) -> dict[str, Any]:
    """An empty instances dict with ``categories`` ``{id: name}``."""
    listed = [{"id": i, "name": name} for i, name in sorted(categories.items())]
    return {"images": [], "annotations": [], "categories": listed}


def add_image(converted: Converted, file_name: str, width: int, height: int, place: str) -> int:
    """Adds an images entry (ids 1, 2, ... in order); returns its id."""
    images = converted.coco["images"]
    image_id = len(images) + 1
    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    converted.image_places.append(place)
    return image_id


def add_box(
    converted: Converted,
    image_id: int,
    category_id: int,
    xywh: list[float],
    iscrowd: bool,
    place: str,
) -> None:
    """Adds an annotation (ids 1, 2, ... in order) of a box ``[x, y, w, h]`` in pixels."""
    annotations = converted.coco["annotations"]
    w, h = xywh[2], xywh[3]
    annotations.append(
        {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": xywh,
            "area": max(w, 0.0) * max(h, 0.0),
            "iscrowd": int(iscrowd),
        }
    )
    converted.annotation_places.append(place)


def convert_to_coco(data: str, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Writes the train and val splits of ``voc:ROOT`` or ``yolo:DATA_YAML`` as COCO instances
    files, ``out/annotations/instances_{train,val}.json``, the images left in place: each file's
    ``file_name``s are relative to its split's images folder, which its ``info.images_dir``
    names (an absolute path) and the returned dict gives as ``images_train`` and ``images_val``
    (with ``train`` and ``val``, the JSON files). ``--data coco:IMAGES_TRAIN,TRAIN,IMAGES_VAL,
    VAL`` then reads what ``data`` reads.

    Raises :class:`CocoFormatError` for the first error of a split, as training would (image
    files that cannot be read are warned about: left in, or out for YOLO, which needs their
    size), FileExistsError where the files are there already, unless ``overwrite``.
    """
    from detrkit.files import existing_results, write_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--to {out}: a file is there; the COCO files go into a directory")
    targets = {split: out / "annotations" / f"instances_{split}.json" for split in SPLITS}
    existing_results(list(targets.values()), f"--to {out}", overwrite)
    converted = {split: read_split(data, split) for split in SPLITS}
    for split in SPLITS:
        converted[split].raise_errors(files=False)
    written: dict[str, Path] = {}
    for split in SPLITS:
        images_dir = Path(os.path.abspath(converted[split].images_dir))
        info = {
            "description": f"{data} ({split} split), converted by detrkit",
            "images_dir": str(images_dir),
        }
        targets[split].parent.mkdir(parents=True, exist_ok=True)
        write_json(targets[split], {"info": info, **converted[split].coco})
        written[split] = targets[split]
        written[f"images_{split}"] = images_dir
    return written
