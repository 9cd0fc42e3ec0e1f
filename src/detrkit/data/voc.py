"""Pascal VOC datasets: ``ROOT/Annotations/ID.xml``, ``ROOT/JPEGImages/ID.jpg`` and the splits'
lists of ids, ``ROOT/ImageSets/Main/{train,val}.txt``, read as COCO instances (see
:mod:`detrkit.data.formats`).

- The train split is ``train.txt``, the validation split ``val.txt`` (the first word of each
  line, so class lists such as ``cat_train.txt`` would do too); a split without its list is an
  error (``missing_split``): there is no guessing.
- Classes: the object names found in the XMLs of both splits, sorted, category ids 1..K. For the
  VOC sets themselves that is the 20 VOC classes in their usual (alphabetical) order.
- Boxes: VOC's pixel coordinates are 1-based and inclusive; a box becomes COCO's
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (as detectron2 reads VOC).
- ``<difficult>1</difficult>`` objects become crowd objects (``iscrowd`` 1): left out of the
  training targets, and detections on them are neither right nor wrong in evaluation, as VOC's
  own evaluation treats difficult objects.
- The image is ``JPEGImages/ID.jpg``, else the XML's ``<filename>`` there, else any
  ``JPEGImages/ID.*``; its size is the XML's ``<size>``, else read from the file's header.
- Image ids are 1, 2, ... in the split list's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from PIL import Image

from detrkit.data.formats import Converted, add_box, add_image, new_coco
from detrkit.data.validate import outside_reason

SPLIT_DIR = Path("ImageSets") / "Main"


@dataclass
class _Element:
    """An XML element with the line it starts at."""

    tag: str
    line: int
    children: list[_Element] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> _Element | None:
        return next((child for child in self.children if child.tag == tag), None)


def _parse(data: bytes) -> _Element:
    """The XML's root element; expat.ExpatError (with ``lineno``) when it is not XML."""
    parser = expat.ParserCreate()
    stack: list[_Element] = []
    roots: list[_Element] = []

    def start(tag: str, attributes: dict) -> None:
        element = _Element(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(element)
        stack.append(element)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack:
            stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.Parse(data, True)
    return roots[0]


class _Malformed(ValueError):
    """A problem of one element: the message names the tag and the value; ``line`` where."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _child_text(element: _Element, tag: str) -> tuple[str, int]:
    child = element.find(tag)
    if child is None:
        raise _Malformed(f"<{element.tag}> has no <{tag}>", element.line)
    return child.text.strip(), child.line


def _number(element: _Element, tag: str) -> float:
    text, line = _child_text(element, tag)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _Malformed(f"<{tag}> is {text!r}; expected a number", line)
    return value


@dataclass
class _VocObject:
    name: str
    difficult: bool
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as the XML has them
    line: int


@dataclass
class _VocFile:
    """What one annotation file says (None where it does not say it)."""

    filename: str | None = None
    size: tuple[int, int] | None = None  # width, height
    objects: list[_VocObject] = field(default_factory=list)


def _read_xml(path: Path, converted: Converted) -> _VocFile | None:
    """The file's image and objects; malformed objects are findings and left out, a file that
    cannot be read or is not a VOC annotation is a finding and None."""
    try:
        root = _parse(path.read_bytes())
    except OSError as error:
        converted.add("malformed_xml", f"{path}: cannot be read ({error.strerror or error})")
        return None
    except expat.ExpatError as error:
        converted.add("malformed_xml", f"{path}:{error.lineno}: not XML ({error})")
        return None
    if root.tag != "annotation":
        converted.add(
            "malformed_xml", f"{path}:{root.line}: root <{root.tag}>; expected <annotation>"
        )
        return None
    found = _VocFile()
    filename = root.find("filename")
    if filename is not None and filename.text.strip():
        found.filename = filename.text.strip()
    size = root.find("size")
    if size is not None:
        try:
            width, height = _number(size, "width"), _number(size, "height")
        except _Malformed:
            width = height = 0.0  # read from the image instead
        if width >= 1 and height >= 1 and width.is_integer() and height.is_integer():
            found.size = (int(width), int(height))
    for element in root.children:
        if element.tag != "object":
            continue
        try:
            found.objects.append(_read_object(element))
        except _Malformed as error:
            converted.add("malformed_xml", f"{path}:{error.line}: {error} (object left out)")
    return found


def _read_object(element: _Element) -> _VocObject:
    name, line = _child_text(element, "name")
    if not name:
        raise _Malformed("<name> is empty", line)
    difficult = element.find("difficult")
    flag = difficult.text.strip() if difficult is not None else "0"
    if flag not in ("0", "1", ""):
        raise _Malformed(f"<difficult> is {flag!r}; expected 0 or 1", difficult.line)
    box = element.find("bndbox")
    if box is None:
        raise _Malformed("<object> has no <bndbox>", element.line)
    xmin, ymin, xmax, ymax = (_number(box, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))
    return _VocObject(name, flag == "1", (xmin, ymin, xmax, ymax), element.line)


def _split_ids(root: Path, split: str, converted: Converted) -> list[str]:
    path = root / SPLIT_DIR / f"{split}.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = "no such file" if not path.exists() else str(error)
        converted.add(
            "missing_split",
            f"{path}: {reason} (voc:ROOT reads the {split} split's image ids from it)",
        )
        return []
    ids = [line.split()[0] for line in lines if line.strip()]
    return list(dict.fromkeys(ids))  # repeated ids once


def _image_name(images_dir: Path, image_id: str, filename: str | None) -> str:
    candidates = [f"{image_id}.jpg"]
    if filename is not None and outside_reason(filename) is None:
        candidates.append(filename)
    candidates += sorted(path.name for path in images_dir.glob(f"{_glob_escape(image_id)}.*"))
    return next((name for name in candidates if (images_dir / name).is_file()), candidates[0])


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def read_voc(root: str | Path, split: str) -> Converted:
    """The ``split`` of the VOC folder ``root`` as COCO instances (see the module's docstring
    for the rules); never raises for problems in the data."""
    root = Path(root)
    images_dir = root / "JPEGImages"
    converted = Converted(new_coco({}), images_dir, root / SPLIT_DIR / f"{split}.txt")
    if not root.is_dir():
        converted.add(
            "missing_split",
            f"{root}: no such folder (voc:ROOT names a Pascal VOC folder: Annotations/, "
            "JPEGImages/, ImageSets/Main/)",
        )
        return converted
    # Both splits' names make the classes: the same for the training and the validation set.
    names: set[str] = set()
    files: dict[str, _VocFile | None] = {}
    for each in ("train", "val"):
        scratch = Converted(new_coco({}), images_dir, converted.source)
        target = converted if each == split else scratch
        for image_id in _split_ids(root, each, target):
            xml = root / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                if each == split:
                    converted.add("missing_xml", f"{xml}: no such file (image {image_id!r})")
                continue
            found = _read_xml(xml, target)
            if found is not None:
                names.update(obj.name for obj in found.objects)
            if each == split:
                files[image_id] = found
    categories = {name: i for i, name in enumerate(sorted(names), start=1)}
    converted.coco = new_coco({i: name for name, i in categories.items()})
    for image_id, found in files.items():
        if found is None:
            continue
        xml = root / "Annotations" / f"{image_id}.xml"
        file_name = _image_name(images_dir, image_id, found.filename)
        size = found.size or _header_size(images_dir / file_name)
        if size is None:
            converted.add(
                "malformed_xml",
                f"{xml}: no <size> with a positive integer <width> and <height>, and the image "
                f"{images_dir / file_name} cannot be read for it (image left out)",
            )
            continue
        coco_id = add_image(converted, file_name, size[0], size[1], str(xml))
        for obj in found.objects:
            xmin, ymin, xmax, ymax = obj.box
            add_box(
                converted,
                coco_id,
                categories[obj.name],
                [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                obj.difficult,
                f"{xml}:{obj.line}",
            )
    return converted


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # Pillow signals broken files with many exception types
        return None
