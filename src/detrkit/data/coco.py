"""COCO-format detection data: the instances JSON, the image files, the dataset built on them,
and detections written as COCO results."""

from __future__ import annotations

import json
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
from detrkit.data.validate import (
    CocoFormatError,
    CocoObject,
    image_file_findings,
    shown_value,
    validate_coco,
)

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


def read_coco_json(path: str | Path, what: str = "instances") -> dict[str, Any]:
    """Parses a COCO instances file and checks it has the ``images``, ``annotations`` and
    ``categories`` lists; raises ValueError naming the file and what is wrong (OSError when it
    cannot be read). The entries are checked by :func:`~detrkit.data.validate.validate_coco`.
    ``what`` names the kind of file in the messages (COCO's panoptic files have the same
    lists)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CocoFormatError(f"{path}: not UTF-8 text ({error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object, got {shown_value(data)}")
    missing = [name for name in SECTIONS if name not in data]
    if missing:
        raise CocoFormatError(
            f"{path}: missing {', '.join(repr(name) for name in missing)} "
            f"(a COCO {what} file has 'images', 'annotations' and 'categories')"
        )
    for name in SECTIONS:
        if not isinstance(data[name], list):
            raise CocoFormatError(f"{path}: {name!r} is {shown_value(data[name])}; expected a list")
    return data


def require_trainable(dataset: Dataset, source: str | Path | None = None) -> None:
    """Raises ValueError when a training run could learn nothing from ``dataset``: no images, or
    (a :class:`CocoDetection`) no usable object, every annotation crowd, empty or outside its
    image. ``source`` names the data in the message (default: the dataset's JSON file)."""
    if isinstance(dataset, CocoDetection):
        source = source or dataset.annotations_json
        if dataset.untrainable_reason is not None:
            raise CocoFormatError(
                f"{source}: {dataset.untrainable_reason}; a training set needs at least one"
            )
    if len(dataset) == 0:
        raise ValueError(f"{source or 'the training set'}: no images to train on")


class _Objects:
    """One image's objects as the targets take them (boxes as x, y, w, h)."""

    def __init__(self) -> None:
        self.xywh: list[list[float]] = []
        self.labels: list[int] = []
        self.areas: list[float] = []
        self.segmentations: list[Any] = []


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` as a ``uint8`` mask ``[height, width]``, 1 inside: polygons
    (merged into one mask), an uncompressed RLE (``counts`` a list) or a compressed one
    (``counts`` a string). It must have passed
    :func:`~detrkit.data.validate.segmentation_problem` at this size: pycocotools checks
    nothing itself."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}
    with warnings.catch_warnings():
        # pycocotools' decoder under NumPy 2 warns on every call about its own array copies.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def label_mapping_of(
    names: dict[int, str], label_mapping: LabelMapping
) -> tuple[list[int], list[str], dict[int, int]]:
    """The labels of categories ``{id: name}``: ``category_ids`` and ``class_names`` per label,
    and each category id's label. ``"contiguous"`` numbers the sorted ids 0..K-1, ``"coco"``
    makes the ids the labels (ids that no category uses keep a placeholder name, like the
    original COCO class list does)."""
    ids = sorted(names)
    if label_mapping == "contiguous":
        category_ids = ids
        class_names = [names[i] for i in ids]
    else:
        category_ids = list(range(ids[-1] + 1)) if ids else []
        class_names = [names.get(i, "N/A") for i in category_ids]
    label_of = {category_id: category_ids.index(category_id) for category_id in ids}
    return category_ids, class_names, label_of


class CocoImages(Dataset):
    """What the COCO-format datasets share: the labels of the categories and the reading of the
    image files, an unreadable one skipped (see :class:`CocoDetection`). Subclasses set
    ``image_ids`` and ``_files`` (per position), call :meth:`_set_labels` and define
    ``_sample(position, image)``."""

    def __init__(
        self,
        images_dir: str | Path,
        transforms: SampleTransform | None,
        label_mapping: LabelMapping,
        skip_unreadable: bool,
    ) -> None:
        if label_mapping not in ("contiguous", "coco"):
            raise ValueError(f"label_mapping must be 'contiguous' or 'coco', got {label_mapping!r}")
        self.images_dir = Path(images_dir)
        self.transforms = transforms
        self.label_mapping = label_mapping
        self.skip_unreadable = skip_unreadable
        self._unreadable: set[str] = set()
        self.image_ids: list[int] = []
        self._files: list[str] = []

    def _set_labels(self, names: dict[int, str], things: dict[int, bool] | None = None) -> None:
        """Sets ``category_ids``, ``class_names`` and ``is_thing`` (per label; ``things``: per
        category id, default all things; placeholder labels of ``"coco"`` count as things)."""
        self.category_ids, self.class_names, self._label_of = label_mapping_of(
            names, self.label_mapping
        )
        things = things or {}
        self.is_thing = [things.get(category_id, True) for category_id in self.category_ids]

    def _missing_files_error(self, source: Path) -> None:
        """Raises ImageReadError when listed image files are not there (for datasets that do not
        skip unreadable files: found at construction, not images into an epoch)."""
        bad = [
            finding.detail
            for name in self._files
            for finding in image_file_findings(self.images_dir, name)
            if finding.severity == "error"
        ]
        if bad:
            raise ImageReadError(
                f"{self.images_dir}: {len(bad)} of the {len(self)} images listed in "
                f"{source} are not there, e.g. {'; '.join(bad[:3])}"
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

    def image_size(self, index: int) -> tuple[int, int] | None:
        """The ``(height, width)`` of item ``index``'s file, from its header (the pixels are not
        decoded); None when it cannot be read."""
        try:
            with Image.open(self.images_dir / self._files[index]) as picture:
                width, height = picture.size
        except Exception:  # Pillow signals unreadable files with many exception types
            return None
        return height, width

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
            # Whether this item's own file was unreadable: DataLoader workers keep their own
            # `skipped`, so the count travels with the sample to reach the training log. Not the
            # number of files stepped over: with two unreadable files side by side, index i
            # steps over both and index i + 1 over the second again, and an epoch's sum would
            # count that file twice.
            target["skipped"] = torch.tensor(int(offset > 0))
            return image, target
        raise ImageReadError(f"{self.images_dir}: none of the {len(self)} images can be read")

    def _sample(self, position: int, image: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class CocoDetection(CocoImages):
    """A detection dataset in COCO format: ``images_dir`` holds the files named in the JSON.

    Items are ``(image, target)``. Without ``transforms`` the image is ``uint8`` ``[3, H, W]``;
    ``transforms`` (e.g. :func:`~detrkit.data.make_train_transforms`) receive the image as a
    ``tv_tensors.Image`` and the target with ``boxes`` as ``tv_tensors.BoundingBoxes`` (XYXY,
    pixels). The returned target has ``boxes`` (normalised cx, cy, w, h of the final image),
    ``labels``, ``image_id``, ``orig_size`` and ``size`` (``[h, w]`` before and after the
    transforms), ``area`` (the annotation's area, in original-image pixels) and ``iscrowd``.

    ``masks=True`` adds ``masks``, each object's ``segmentation`` (polygons, uncompressed or
    compressed RLE) decoded at its image's size: a ``tv_tensors.Mask`` ``[N, H, W]`` for the
    transforms, which move it with the image, and bool ``[N, h, w]`` in the returned target,
    aligned with ``boxes``. Every kept object then needs a segmentation that decodes (the rules
    of :func:`~detrkit.data.validate.validate_coco` with ``masks``), and an image file whose
    size is not the JSON's is an error when it is read (:class:`CocoFormatError` naming both
    files and both sizes): its masks would not cover it pixel for pixel.

    As in the original DETR, crowd objects are left out of the targets, boxes are clipped to the
    image and boxes left empty by the clipping are dropped (as are boxes of zero size, and their
    masks with them); one warning, when the dataset is built, counts what is left out.

    ``label_mapping="contiguous"`` numbers the sorted category ids 0..K-1 (custom datasets);
    ``"coco"`` uses the category ids themselves as labels (the 91-class COCO models). Every
    category is a thing (``is_thing``, per label, all True).

    The JSON file must follow every rule of :mod:`detrkit.data.validate` (the rules
    ``detrkit data check`` reports on): a field missing, null or of a wrong type, a repeated id,
    an annotation of an unknown image or category, a negative box size or a file name leading
    outside ``images_dir`` raise :class:`~detrkit.data.validate.CocoFormatError` (a ValueError)
    naming the file, the entry and the field. A set with no usable object can still be
    evaluated on; :func:`require_trainable` refuses it for training.

    ``coco``: the instances as a dict in the form of the JSON file (``images``,
    ``annotations`` and ``categories`` lists), built in memory: ``annotations_json`` then only
    names them in messages (the readers of :mod:`detrkit.data.formats` build them from Pascal
    VOC and YOLO files). The dict is kept as the ``coco`` attribute.

    An unreadable image is warned about once and skipped: the item at the next index (wrapping
    around) that can be read is returned in its place, and its target's ``skipped`` is 1 (0 for
    an item read from its own file: summed over an epoch, the number of items whose file could
    not be read). The dataset's ``skipped`` counts the unreadable files found so far (in this
    process: each DataLoader worker keeps its own count). With ``skip_unreadable=False`` (the
    default under ``strict=True``) it raises :class:`ImageReadError` instead, a missing file at
    construction: evaluation needs that, as a skipped image's objects would count as missed and
    the image read in its place twice.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        transforms: SampleTransform | None = None,
        label_mapping: LabelMapping = "contiguous",
        strict: bool = False,
        skip_unreadable: bool | None = None,
        masks: bool = False,
        coco: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            images_dir,
            transforms,
            label_mapping,
            not strict if skip_unreadable is None else skip_unreadable,
        )
        self.annotations_json = Path(annotations_json)
        self.strict = strict
        self.masks = masks
        # The instances built in memory (Pascal VOC and YOLO data, see detrkit.data.formats),
        # kept for evaluation; None when read from annotations_json, re-read when needed.
        self.coco = coco

        data = read_coco_json(self.annotations_json) if coco is None else coco
        index = validate_coco(data, masks=masks)
        index.raise_errors(self.annotations_json)
        left_out = index.left_out_counts()
        if any(left_out.values()):
            crowd, empty, off = left_out.values()
            warnings.warn(
                f"{self.annotations_json}: left out of the targets: {crowd} crowd annotations, "
                f"{empty} boxes of zero size, {off} boxes wholly outside their image "
                "(`detrkit data check` lists them)",
                stacklevel=2,
            )
        # Why a training run could learn nothing from this set (None: it can); see
        # require_trainable. Kept instead of the index, which workers would copy.
        self.untrainable_reason = index.untrainable_reason()
        self._set_labels(index.categories)
        # Sorted ids, as torchvision's and the original DETR's COCO datasets order them.
        self.image_ids = sorted(index.images)
        self._files = [index.images[i].file_name for i in self.image_ids]
        # The JSON's (height, width) of each image, which its masks are decoded at.
        self._sizes = [(index.images[i].height, index.images[i].width) for i in self.image_ids]
        self._objects = [self._targets_of(index.objects[i]) for i in self.image_ids]
        if not self.skip_unreadable:
            self._missing_files_error(self.annotations_json)

    def _targets_of(self, found: list[CocoObject]) -> _Objects:
        objects = _Objects()
        for item in found:
            objects.xywh.append(item.xywh)
            objects.labels.append(self._label_of[item.category_id])
            objects.areas.append(item.area)
            if self.masks:
                objects.segmentations.append(item.segmentation)
        return objects

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
        if self.masks:
            target["masks"] = self._masks(position, (height, width), keep.tolist())
        return to_training_sample(tv_tensors.Image(image), target, self.transforms)

    def _masks(self, position: int, size: tuple[int, int], keep: list[bool]) -> tv_tensors.Mask:
        """The kept objects' masks ``[N, H, W]``, decoded at the image file's size."""
        listed = self._sizes[position]
        if listed != size:
            raise CocoFormatError(
                f"{self.annotations_json}: image {self.images_dir / self._files[position]} is "
                f"{size[1]}x{size[0]} (width x height), the JSON says {listed[1]}x{listed[0]}; "
                "its masks would not cover it pixel for pixel"
            )
        segmentations = self._objects[position].segmentations
        masks = [
            decode_segmentation(segmentation, *size)
            for segmentation, kept in zip(segmentations, keep)
            if kept
        ]
        stacked = np.stack(masks) if masks else np.zeros((0, *size), dtype=np.uint8)
        return tv_tensors.Mask(torch.from_numpy(stacked).bool())


def to_coco_results(
    image_id: int, detections: dict[str, Tensor], category_ids: Sequence[int] | None = None
) -> list[dict]:
    """One image's detections (absolute xyxy boxes) as COCO result entries (xywh boxes), labels
    mapped back to the dataset's category ids when a mapping is given; detections with
    ``masks`` ``[K, H, W]`` add each one's ``segmentation`` as compressed RLE."""
    boxes = detections["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    labels = detections["labels"].tolist()
    scores = detections["scores"].float().tolist()
    results = [
        {
            "image_id": int(image_id),
            "category_id": int(category_ids[label] if category_ids is not None else label),
            "bbox": [round(v, 3) for v in box],
            "score": round(score, 5),
        }
        for box, label, score in zip(xywh, labels, scores)
    ]
    if "masks" in detections:
        for result, rle in zip(results, masks_to_rle(detections["masks"])):
            result["segmentation"] = rle
    return results


def masks_to_rle(masks: Tensor) -> list[dict]:
    """Binary masks ``[K, H, W]`` as COCO's compressed RLE, ``counts`` as text (JSON-ready)."""
    from pycocotools import mask as mask_utils

    array = np.asfortranarray(masks.detach().cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    encoded = mask_utils.encode(array)  # [H, W, K] Fortran order -> K RLEs
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in encoded]
