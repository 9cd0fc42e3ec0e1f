"""COCO-format detection data: the instances JSON, the image files, and the dataset built on them."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from detrkit.data.transforms import SampleTransform, to_training_sample

LabelMapping = Literal["contiguous", "coco"]

SECTIONS = ("images", "annotations", "categories")
_TORCHVISION_DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class ImageReadError(OSError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> Tensor:
    """Reads an image file as RGB ``uint8`` ``[3, H, W]``.

    Greyscale, RGBA, palette, CMYK and 16-bit images are converted to 8-bit RGB (alpha is dropped,
    16-bit values are scaled). JPEG, PNG, GIF and WebP go through torchvision's decoders, other
    formats through Pillow. EXIF orientation is ignored: COCO boxes refer to the stored pixels.
    Raises :class:`ImageReadError` naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path}: a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, warning on every
            # call; they remain the fastest decoders in the supported torchvision range.
            warnings.filterwarnings("ignore", _TORCHVISION_DECODER_DEPRECATION, DeprecationWarning)
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except RuntimeError:
        # torchvision refuses formats it has no decoder for (BMP, TIFF, ...) as well as broken
        # files; Pillow reads the former and explains the latter.
        image = _read_with_pillow(path)
    if image.dim() == 4:  # animated GIF: [frames, 3, H, W] -> first frame
        image = image[0]
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _read_with_pillow(path: Path) -> Tensor:
    try:
        with Image.open(path) as pil:
            pil.load()
            if pil.mode.startswith("I"):
                # Pillow's own "I;16" -> "RGB" conversion clips at 255 instead of scaling.
                wide = np.asarray(pil).astype(np.int64)
                grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
                array = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                array = np.array(pil.convert("RGB"))  # a writable copy, for torch.from_numpy
    except Exception as error:  # Pillow signals broken files with many exception types
        raise ImageReadError(f"{path}: cannot decode the image ({error})") from error
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Parses a COCO instances file and checks it has the ``images``, ``annotations`` and
    ``categories`` lists; raises ValueError naming the file and what is wrong."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    missing = [name for name in SECTIONS if name not in data]
    if missing:
        raise ValueError(
            f"{path}: missing {', '.join(repr(name) for name in missing)} "
            f"(a COCO instances file has 'images', 'annotations' and 'categories')"
        )
    for name in SECTIONS:
        if not isinstance(data[name], list):
            raise ValueError(f"{path}: {name!r} must be a list, got {type(data[name]).__name__}")
    return data


def _require(entry: Any, fields: Sequence[str], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is not an object")
    missing = [name for name in fields if name not in entry]
    if missing:
        raise ValueError(f"{path}: {where} has no {', '.join(repr(name) for name in missing)}")
    for name in fields:
        value = entry[name]
        if name.endswith("id") and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{path}: {where} has {name} {value!r}; expected an integer")


def is_xywh(bbox: Any) -> bool:
    """Whether ``bbox`` is a COCO box as this reader takes it: a list of 4 finite numbers."""
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox
        )
    )


class _Objects:
    """One image's non-crowd annotations of known categories (boxes as x, y, w, h)."""

    def __init__(self) -> None:
        self.xywh: list[list[float]] = []
        self.labels: list[int] = []
        self.areas: list[float] = []


class CocoDetection(Dataset):
    """A detection dataset in COCO format: ``images_dir`` holds the files named in the JSON.

    Items are ``(image, target)``. Without ``transforms`` the image is ``uint8`` ``[3, H, W]``;
    ``transforms`` (e.g. :func:`~detrkit.data.make_train_transforms`) receive the image as a
    ``tv_tensors.Image`` and the target with ``boxes`` as ``tv_tensors.BoundingBoxes`` (XYXY,
    pixels). The returned target has ``boxes`` (normalised cx, cy, w, h of the final image),
    ``labels``, ``image_id``, ``orig_size`` and ``size`` (``[h, w]`` before and after the
    transforms), ``area`` (the annotation's area, in original-image pixels) and ``iscrowd``.

    As in the original DETR, crowd objects are left out of the targets, boxes are clipped to the
    image and boxes left empty by the clipping are dropped.

    ``label_mapping="contiguous"`` numbers the sorted category ids 0..K-1 (custom datasets);
    ``"coco"`` uses the category ids themselves as labels (the 91-class COCO models).

    An unreadable image is warned about once and skipped: the item at the next index (wrapping
    around) that can be read is returned in its place, its target's ``skipped`` says how many
    files it stepped over, and the dataset's ``skipped`` counts the unreadable files found so far
    (in this process: each DataLoader worker keeps its own count). With
    ``skip_unreadable=False`` (the default under ``strict=True``) it raises
    :class:`ImageReadError` instead, a missing file at construction: evaluation needs that, as a
    skipped image's objects would count as missed and the image read in its place twice.
    Annotations of unknown categories are ignored with a warning, or raise ValueError with
    ``strict=True``.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        transforms: SampleTransform | None = None,
        label_mapping: LabelMapping = "contiguous",
        strict: bool = False,
        skip_unreadable: bool | None = None,
    ) -> None:
        if label_mapping not in ("contiguous", "coco"):
            raise ValueError(f"label_mapping must be 'contiguous' or 'coco', got {label_mapping!r}")
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        self.transforms = transforms
        self.label_mapping = label_mapping
        self.strict = strict
        self.skip_unreadable = not strict if skip_unreadable is None else skip_unreadable
        self._unreadable: set[str] = set()

        data = read_coco_json(self.annotations_json)
        self._index_categories(data["categories"])
        self._index_images(data["images"])
        self._index_annotations(data["annotations"])
        if not self.skip_unreadable:  # found now, not images into an epoch
            missing = [name for name in self._files if not (self.images_dir / name).is_file()]
            if missing:
                raise ImageReadError(
                    f"{self.images_dir}: {len(missing)} of the {len(self)} images listed in "
                    f"{self.annotations_json} are not there, e.g. {', '.join(missing[:3])}"
                )

    def _index_categories(self, categories: list[Any]) -> None:
        path = self.annotations_json
        names: dict[int, str] = {}
        for i, category in enumerate(categories):
            _require(category, ("id",), f"categories[{i}]", path)
            category_id = category["id"]
            if category_id < 0:
                raise ValueError(f"{path}: categories[{i}] has a negative id {category_id}")
            names[category_id] = str(category.get("name", category_id))
        if not names:
            raise ValueError(f"{path}: 'categories' is empty")
        ids = sorted(names)
        if self.label_mapping == "contiguous":
            self.category_ids = ids
            self.class_names = [names[i] for i in ids]
        else:
            # The ids are the labels; ids no category uses keep a placeholder name, like the
            # original COCO class list does.
            self.category_ids = list(range(ids[-1] + 1))
            self.class_names = [names.get(i, "N/A") for i in self.category_ids]
        self._label_of = {category_id: self.category_ids.index(category_id) for category_id in ids}

    def _index_images(self, images: list[Any]) -> None:
        entries: dict[int, str] = {}
        for i, image in enumerate(images):
            _require(image, ("id", "file_name"), f"images[{i}]", self.annotations_json)
            entries.setdefault(image["id"], str(image["file_name"]))
        # Sorted ids, as torchvision's and the original DETR's COCO datasets order them.
        self.image_ids = sorted(entries)
        self._files = [entries[image_id] for image_id in self.image_ids]
        self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _index_annotations(self, annotations: list[Any]) -> None:
        path = self.annotations_json
        self._objects = [_Objects() for _ in self.image_ids]
        unknown_category = unknown_image = 0
        for i, annotation in enumerate(annotations):
            where = f"annotations[{i}]"
            _require(annotation, ("image_id", "category_id", "bbox"), where, path)
            bbox = annotation["bbox"]
            if not is_xywh(bbox):
                raise ValueError(
                    f"{path}: {where} has bbox {bbox!r}; expected [x, y, w, h], 4 finite numbers"
                )
            if annotation.get("iscrowd", 0):
                continue
            position = self._position.get(annotation["image_id"])
            label = self._label_of.get(annotation["category_id"])
            if position is None:
                unknown_image += 1
                continue
            if label is None:
                if self.strict:
                    raise ValueError(
                        f"{path}: {where} has category_id {annotation['category_id']}, "
                        "which no category has"
                    )
                unknown_category += 1
                continue
            objects = self._objects[position]
            objects.xywh.append([float(v) for v in bbox])
            objects.labels.append(label)
            objects.areas.append(float(annotation.get("area", bbox[2] * bbox[3])))
        if unknown_category or unknown_image:
            warnings.warn(
                f"{path}: ignoring {unknown_category} annotations of unknown categories and "
                f"{unknown_image} of unknown images",
                stacklevel=3,
            )

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def skipped(self) -> int:
        """How many unreadable image files were skipped so far, in this process."""
        return len(self._unreadable)

    def labels_to_category_ids(self, labels: Tensor | Sequence[int]) -> Tensor:
        """Maps labels (predicted or from targets) back to the JSON's category ids."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        return torch.tensor(self.category_ids, dtype=torch.int64)[labels]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            file_name = self._files[position]
            if file_name in self._unreadable:
                continue
            try:
                image = read_image(self.images_dir / file_name)
            except ImageReadError as error:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(file_name)
                warnings.warn(f"skipping unreadable image {error}", stacklevel=2)
                continue
            image, target = self._sample(position, image)
            # How many unreadable files this item stepped over: DataLoader workers keep their own
            # `skipped`, so the count travels with the sample to reach the training log.
            target["skipped"] = torch.tensor(offset)
            return image, target
        raise ImageReadError(f"{self.images_dir}: none of the {len(self)} images can be read")

    def _sample(self, position: int, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        height, width = image.shape[-2:]
        objects = self._objects[position]
        boxes = torch.tensor(objects.xywh, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [N, 4] xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes[keep], format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(objects.labels, dtype=torch.int64)[keep],
            "image_id": torch.tensor(self.image_ids[position]),
            "orig_size": torch.tensor([height, width]),
            "area": torch.tensor(objects.areas, dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        return to_training_sample(tv_tensors.Image(image), target, self.transforms)
