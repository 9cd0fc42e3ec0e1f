"""YOLO datasets (the Ultralytics layout), read as COCO instances (see
:mod:`detrkit.data.formats`).

A ``data.yaml`` names the classes and the splits::

    path: .            # the dataset's root: relative to the YAML's folder (default: that folder)
    train: images/train   # a folder of images, a .txt list of image paths, or a list of these
    val: images/val
    names: [cat, dog]  # or {0: cat, 1: dog}; the class ids are the category ids
    nc: 2              # optional; must then be the number of names

- Folders are searched recursively for images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``,
  ``.gif``, ``.tif``, ``.tiff``, ``.webp``, any case), in sorted order; lines of a list are image
  paths, relative ones to the list's folder.
- Each image's labels are in the file found by Ultralytics' rule: the last ``images`` folder of
  its path replaced by ``labels`` and the suffix by ``.txt`` (``images/train/a.jpg`` ->
  ``labels/train/a.txt``). One object a line, ``class cx cy w h``, the box's centre and size
  normalised to [0, 1] by the image's width and height; blank lines are skipped.
- An image without a label file has no objects (a warning, ``image_without_label``); a label
  file beside the split's ones without an image of its name is a warning too
  (``label_without_image``). A line that is not 5 numbers, a class id data.yaml does not name
  and a coordinate outside [0, 1] are errors naming the file and line.
- Image sizes are read from the files' headers (YOLO's labels need them); an image that cannot
  be read is left out (an error for an evaluation set, skipped by a training set).
- Image ids are 1, 2, ... in the order found; file names are relative to the folder holding
  all the split's images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from PIL import Image

from detrkit.data.formats import Converted, add_box, add_image, new_coco

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def label_path(image: Path) -> Path:
    """Where an image's label file is (Ultralytics' rule): the last ``images`` component of the
    path replaced by ``labels``, the suffix by ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _image_folder(labels: Path) -> Path:
    """The folder of the images whose labels are in ``labels`` (the rule of :func:`label_path`
    backwards)."""
    parts = list(labels.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            break
    return Path(*parts)


def _names(config: dict, yaml_path: Path, converted: Converted) -> dict[int, str] | None:
    names = config.get("names")
    problem = None
    if names is None:
        problem = "has no 'names' (the class names: a list, or {id: name})"
    elif isinstance(names, list):
        found = dict(enumerate(names))
    elif isinstance(names, dict):
        found = names
    else:
        problem = f"has names {names!r}; expected a list of names, or {{id: name}}"
    if problem is None:
        bad = [k for k in found if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0)]
        if bad:
            problem = f"has names with class id {bad[0]!r}; expected non-negative integers"
        else:
            found = {k: str(name) for k, name in found.items()}
            nc = config.get("nc")
            if nc is not None and nc != len(found):
                problem = f"has nc {nc!r} but {len(found)} names"
            elif not found:
                problem = "has no class names ('names' is empty)"
    if problem is not None:
        converted.add("invalid_data_yaml", f"{yaml_path} {problem}")
        return None
    return found


def _split_images(
    config: dict, root: Path, yaml_path: Path, split: str, converted: Converted
) -> list[Path] | None:
    entry = config.get(split)
    if entry is None:
        converted.add(
            "invalid_data_yaml",
            f"{yaml_path} has no {split!r} (the {split} images: a folder, a .txt list of images, "
            "or a list of these)",
        )
        return None
    entries = entry if isinstance(entry, list) else [entry]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        converted.add(
            "invalid_data_yaml",
            f"{yaml_path} has {split} {entry!r}; expected a folder, a .txt list or a list of these",
        )
        return None
    images: list[Path] = []
    for name in entries:
        path = root / name
        if path.is_dir():
            images += sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        elif path.is_file() and path.suffix.lower() == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            images += [path.parent / line.strip() for line in lines if line.strip()]
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            what = "no such folder or file" if not path.exists() else "not a folder, list or image"
            converted.add("missing_split", f"{path}: {what} ({yaml_path}'s {split})")
    if len(entries) == 1:
        converted.source = root / entries[0]
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in images))


def _read_labels(
    path: Path, names: dict[int, str], size: tuple[int, int], converted: Converted
) -> list[tuple[int, list[float], int]]:
    """The file's objects as (class id, [x, y, w, h] in pixels, line); bad lines are findings."""
    width, height = size
    objects = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        converted.add("malformed_label_line", f"{path}: cannot be read ({error})")
        return objects
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            polygon = " (a segmentation polygon? only boxes are read)" if len(fields) > 5 else ""
            converted.add(
                "malformed_label_line",
                f"{where}: {len(fields)} fields {line.strip()!r}; expected 5, "
                f"'class cx cy w h'{polygon}",
            )
            continue
        values = [_float(field) for field in fields]
        bad = next((f for f, v in zip(fields, values) if v is None), None)
        if bad is not None:
            converted.add(
                "malformed_label_line", f"{where}: {bad!r} in {line.strip()!r} is not a number"
            )
            continue
        class_value, cx, cy, w, h = values
        if not class_value.is_integer():
            converted.add(
                "malformed_label_line",
                f"{where}: class {fields[0]!r} is not an integer (in {line.strip()!r})",
            )
            continue
        class_id = int(class_value)
        if class_id not in names:
            converted.add(
                "class_id_out_of_range",
                f"{where}: class {class_id}, which data.yaml's names do not name "
                f"(ids {_ids(names)})",
            )
            continue
        if not all(0 <= v <= 1 for v in (cx, cy, w, h)):
            converted.add(
                "coordinates_out_of_range",
                f"{where}: {line.strip()!r} has coordinates outside [0, 1]",
            )
            continue
        box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
        objects.append((class_id, box, number))
    return objects


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ids(names: dict[int, str]) -> str:
    ids = sorted(names)
    if ids == list(range(len(ids))):
        return f"0..{len(ids) - 1}"
    return ", ".join(map(str, ids))


def _image_size(path: Path, converted: Converted) -> tuple[int, int] | None:
    if not path.exists():
        converted.add("missing_image_file", f"{path}: no such file")
        return None
    if not path.is_file():
        converted.add("image_not_a_file", f"{path}: not a file")
        return None
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as error:  # Pillow signals broken files with many exception types
        converted.add("unreadable_image", f"{path}: cannot be read ({error})")
        return None


def _load_yaml(yaml_path: Path, converted: Converted) -> dict[str, Any] | None:
    import yaml

    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        reason = "no such file" if not yaml_path.exists() else str(error)
        converted.add("invalid_data_yaml", f"{yaml_path}: cannot be read ({reason})")
        return None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        converted.add("invalid_data_yaml", f"{yaml_path}{line}: not YAML ({problem})")
        return None
    if not isinstance(config, dict):
        converted.add(
            "invalid_data_yaml", f"{yaml_path}: {type(config).__name__}; expected a mapping"
        )
        return None
    return config


def read_yolo(data_yaml: str | Path, split: str) -> Converted:
    """The ``split`` of the YOLO dataset ``data_yaml`` describes as COCO instances (see the
    module's docstring for the rules); never raises for problems in the data."""
    yaml_path = Path(data_yaml)
    converted = Converted(new_coco({}), yaml_path.parent, yaml_path)
    config = _load_yaml(yaml_path, converted)
    if config is None:
        return converted
    names = _names(config, yaml_path, converted)
    root = yaml_path.parent
    if isinstance(config.get("path"), str) and config["path"]:
        root = root / config["path"]
    images = _split_images(config, root, yaml_path, split, converted)
    if names is None or images is None:
        return converted
    converted.coco = new_coco(names)
    parents = [str(image.parent) for image in images]
    converted.images_dir = Path(os.path.commonpath(parents)) if parents else root
    expected: set[Path] = set()
    for image in images:
        size = _image_size(image, converted)
        labels = label_path(image)
        expected.add(labels)
        if size is None:
            continue
        file_name = image.relative_to(converted.images_dir).as_posix()
        image_id = add_image(converted, file_name, size[0], size[1], str(image))
        if not labels.is_file():
            converted.add("image_without_label", f"{image}: no label file {labels}")
            continue
        for class_id, box, line in _read_labels(labels, names, size, converted):
            add_box(converted, image_id, class_id, box, False, f"{labels}:{line}")
    _labels_without_images(expected, converted)
    return converted


def _labels_without_images(expected: set[Path], converted: Converted) -> None:
    """Adds a finding for each label file in the split's label folders that no image has."""
    for folder in sorted({path.parent for path in expected}):
        if not folder.is_dir():
            continue
        images = _image_folder(folder)
        stems = (
            {p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            if images.is_dir()
            else set()
        )
        for path in sorted(folder.glob("*.txt")):
            if path in expected or path.name == "classes.txt" or path.stem in stems:
                continue
            converted.add(
                "label_without_image",
                f"{path}: no image {path.stem}.* in {images}",
            )
