"""A small built-in detection dataset: scikit-learn's handwritten digits drawn on varied canvases.

The 1,797 8x8 digits ship with scikit-learn, so nothing is downloaded. Each scene is a canvas of
128 to 256 pixels a side (flat colour, gradient and/or noise) with 1 to 5 coloured digits, 16 to
64 pixels high, that do not overlap. A scene depends only on ``(seed, split, index)``. Train and
val draw from disjoint sets of digits (a fixed 80/20 split of the 1,797).

Boxes are exact: a digit covers the pixels where its upscaled intensity is at least a quarter of
full ink, and its colour differs from the background under it by at least 64 in every channel,
so every covered pixel (and no other) changes, and the box encloses exactly the changed pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detrkit.data.coco import masks_to_rle
from detrkit.data.transforms import SampleTransform, to_training_sample
from detrkit.files import existing_results, write_atomically, write_json

Split = Literal["train", "val"]

CLASS_NAMES = [str(digit) for digit in range(10)]  # label = category id = the digit
# The panoptic version: the digits are things, the canvas around them is one stuff segment.
CANVAS_NAME = "canvas"
PANOPTIC_CLASS_NAMES = [*CLASS_NAMES, CANVAS_NAME]  # the canvas: label = category id = 10
CANVAS_SIDES = (128, 256)
DIGIT_HEIGHTS = (16, 64)
DIGITS_PER_IMAGE = (1, 5)
TRAIN_FRACTION = 0.8

# Items drawn once and kept by a dataset: a training run reads each scene every epoch, and drawing
# one (its background noise, mostly) costs more than the rest of preparing the sample. At most
# 192 KB each (a 256x256 image), about 520 KB with the masks of five digits. They are kept by the
# process that reads them: with DataLoader workers, which start afresh each epoch, for an epoch.
_KEPT_SCENES = 1024
_SPLIT_SEED = 1797  # fixes the train/val split of the digits, whatever the scenes' seed
_SPLIT_CODES = {"train": 0, "val": 1}
_INK_THRESHOLD = 0.25  # fraction of full ink below which a pixel is not part of the digit
_CONTRAST = 64  # least per-channel difference between a digit's colour and its background
_GRADIENT = 60  # largest per-channel change across a gradient background
_NOISE = 20  # largest per-pixel noise; with the gradient, keeps a channel's range <= 100 < 127,
# so a colour _CONTRAST away from all of it always exists


@dataclass
class DigitsScene:
    """One generated image and its objects."""

    image: np.ndarray  # [H, W, 3] uint8
    background: np.ndarray  # [H, W, 3] uint8: the canvas before the digits were drawn
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 in pixels, tight around each mask
    labels: np.ndarray  # [N] int64, the digits
    masks: np.ndarray  # [N, H, W] bool: the pixels each digit covers
    sources: np.ndarray  # [N] int64: the digits' indices in sklearn's load_digits()


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits dataset needs scikit-learn (pip install scikit-learn), whose bundled "
            "copy of the digits it draws"
        ) from error
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


@functools.cache
def _split_indices(split: str) -> np.ndarray:
    count = len(_digits()[0])
    order = np.random.default_rng(_SPLIT_SEED).permutation(count)
    cut = round(count * TRAIN_FRACTION)
    indices = np.sort(order[:cut] if split == "train" else order[cut:])
    indices.setflags(write=False)
    return indices


def digit_indices(split: Split) -> np.ndarray:
    """The indices (into sklearn's ``load_digits()``) of the digits a split draws from."""
    _check_split(split)
    return _split_indices(split).copy()


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[:] = rng.uniform(0, 255, size=3)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xs * np.cos(angle) + ys * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)  # [H, W] in [0, 1]
        canvas += ramp[:, :, None] * rng.uniform(-_GRADIENT, _GRADIENT, size=3).astype(np.float32)
    if rng.random() < 0.5:
        noise = rng.normal(0.0, rng.uniform(2, 8), size=(height, width, 3)).astype(np.float32)
        canvas += np.clip(noise, -_NOISE, _NOISE)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    low = region.min(axis=(0, 1)).astype(int)
    high = region.max(axis=(0, 1)).astype(int)
    colour = np.empty(3, dtype=np.float32)
    for channel in range(3):
        ranges = []
        if high[channel] + _CONTRAST <= 255:
            ranges.append((high[channel] + _CONTRAST, 255))
        if low[channel] - _CONTRAST >= 0:
            ranges.append((0, low[channel] - _CONTRAST))
        start, stop = ranges[rng.integers(len(ranges))]
        colour[channel] = rng.integers(start, stop + 1)
    return colour


def _ink(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8x8 digit upscaled to ``[height, width]`` ink in [0, 1], zero outside the digit."""
    scaled = np.asarray(Image.fromarray(digit).resize((width, height), Image.Resampling.BILINEAR))
    return np.where(scaled >= _INK_THRESHOLD, np.minimum(scaled, 1.0), 0.0).astype(np.float32)


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < ox1 and ox0 < x1 and y0 < oy1 and oy0 < y1 for ox0, oy0, ox1, oy1 in others)


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """A scene's (height, width): the first draw of its generator."""
    height, width = rng.integers(*CANVAS_SIDES, size=2, endpoint=True)
    return int(height), int(width)


def scene_size(split: Split, index: int, seed: int = 0) -> tuple[int, int]:
    """The ``(height, width)`` of :func:`make_scene`'s scene, without drawing it."""
    _check_split(split)
    return _canvas_size(np.random.default_rng([seed, _SPLIT_CODES[split], index]))


def make_scene(split: Split, index: int, seed: int = 0) -> DigitsScene:
    """Generates scene ``index`` of a split; the same arguments always give the same scene."""
    _check_split(split)
    images, targets = _digits()
    pool = _split_indices(split)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    height, width = _canvas_size(rng)
    background = _background(rng, height, width)
    canvas = background.astype(np.float32)

    placed: list[tuple[int, int, int, int]] = []
    boxes, labels, masks, sources = [], [], [], []
    for _ in range(int(rng.integers(*DIGITS_PER_IMAGE, endpoint=True))):
        for _attempt in range(20):
            digit_height = int(rng.integers(*DIGIT_HEIGHTS, endpoint=True))
            digit_width = max(8, round(digit_height * rng.uniform(0.75, 1.25)))
            x0 = int(rng.integers(0, width - digit_width, endpoint=True))
            y0 = int(rng.integers(0, height - digit_height, endpoint=True))
            region = (x0, y0, x0 + digit_width, y0 + digit_height)
            if not _overlaps(region, placed):
                break
        else:
            continue  # no free space found: the scene gets fewer digits
        source = int(rng.choice(pool))
        ink = _ink(images[source], digit_height, digit_width)  # [h, w]
        if not ink.any():
            continue
        placed.append(region)
        window = (slice(y0, y0 + digit_height), slice(x0, x0 + digit_width))
        colour = _contrasting_colour(rng, background[window])
        alpha = ink[:, :, None]
        canvas[window] = canvas[window] * (1 - alpha) + colour * alpha
        mask = np.zeros((height, width), dtype=bool)
        mask[window] = ink > 0
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        labels.append(targets[source])
        masks.append(mask)
        sources.append(source)

    return DigitsScene(
        image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
        background=background,
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.array(labels, dtype=np.int64),
        masks=np.array(masks, dtype=bool).reshape(-1, height, width),
        sources=np.array(sources, dtype=np.int64),
    )


def panoptic_segments(scene: DigitsScene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scene as panoptic segments: every digit, then the canvas (every pixel no digit covers,
    labelled 10). Returns ``masks`` ``[N + 1, H, W]`` bool, ``labels`` ``[N + 1]`` and tight
    ``boxes`` ``[N + 1, 4]`` xyxy (the canvas's spans the pixels it has)."""
    canvas = ~scene.masks.any(axis=0)  # [H, W]
    rows, cols = np.nonzero(canvas)
    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] if rows.size else [0, 0, 0, 0]
    masks = np.concatenate([scene.masks, canvas[None]])
    labels = np.append(scene.labels, len(CLASS_NAMES))
    boxes = np.concatenate([scene.boxes, np.array([box], dtype=np.float32)])
    return masks, labels, boxes


class DigitsDetection(Dataset):
    """``num_images`` generated digit scenes of a split, made on the fly (nothing on disk).

    Items are ``(image, target)`` in the same format as :class:`~detrkit.data.CocoDetection`;
    labels are the digits 0-9 and image ids start at 1, as in :func:`write_digits_coco`.
    ``masks=True`` adds each digit's exact mask (its stroke pixels) as ``masks``; ``panoptic``
    adds the canvas as an 11th class, a stuff segment (``is_thing`` False), after the digits.
    """

    def __init__(
        self,
        split: Split = "train",
        num_images: int = 1000,
        seed: int = 0,
        transforms: SampleTransform | None = None,
        masks: bool = False,
        panoptic: bool = False,
    ) -> None:
        _check_split(split)
        if num_images < 0:
            raise ValueError(f"num_images must be non-negative, got {num_images}")
        self.split = split
        self.num_images = num_images
        self.panoptic = panoptic
        self.masks = masks or panoptic
        self.class_names = list(PANOPTIC_CLASS_NAMES if panoptic else CLASS_NAMES)
        self.category_ids = list(range(len(self.class_names)))
        self.num_classes = len(self.class_names)
        self.is_thing = [name != CANVAS_NAME for name in self.class_names]
        self.seed = seed
        self.transforms = transforms
        self._kept: dict[int, tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]] = {}

    def scene(self, index: int) -> DigitsScene:
        """The generated scene behind item ``index``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return make_scene(self.split, index, self.seed)

    def image_size(self, index: int) -> tuple[int, int]:
        """The ``(height, width)`` of item ``index``, without drawing it."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return scene_size(self.split, index, self.seed)

    def labels_to_category_ids(self, labels: Tensor | Sequence[int]) -> Tensor:
        """Labels are the category ids here; kept for the same interface as CocoDetection."""
        return torch.as_tensor(labels, dtype=torch.int64).clone()

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if index < 0:
            index += self.num_images
        image, boxes, masks, target = self._untransformed(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes.clone(), format="XYXY", canvas_size=tuple(image.shape[1:])
            ),
            **{key: value.clone() for key, value in target.items()},
        }
        if masks is not None:
            target["masks"] = tv_tensors.Mask(masks.clone())
        return to_training_sample(tv_tensors.Image(image.clone()), target, self.transforms)

    def _untransformed(self, index: int) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Item ``index`` before its transforms: image ``[3, H, W]`` uint8, boxes ``[N, 4]``
        x1, y1, x2, y2 in pixels, masks ``[N, H, W]`` (None unless the dataset has masks) and the
        rest of the target. Drawn once, then kept for the first ``_KEPT_SCENES`` items (callers
        copy before changing them)."""
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        scene = self.scene(index)
        height, width = scene.image.shape[:2]
        if self.panoptic:
            masks, labels, boxes = panoptic_segments(scene)
        else:
            masks, labels, boxes = scene.masks, scene.labels, scene.boxes
        item = (
            torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(),
            torch.from_numpy(boxes),
            torch.from_numpy(masks) if self.masks else None,
            {
                "labels": torch.from_numpy(labels),
                "image_id": torch.tensor(index + 1),
                "orig_size": torch.tensor([height, width]),
                "area": torch.from_numpy(masks.sum(axis=(1, 2)).astype(np.float32)),
                "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            },
        )
        if len(self._kept) < _KEPT_SCENES:
            self._kept[index] = item
        return item

    def panoptic_target(self, index: int) -> Tensor:
        """Scene ``index``'s ground truth for panoptic quality, ``[H, W, 2]`` ``int64``: each
        pixel's (category id, segment id) from :func:`panoptic_segments` (the digits, then the
        canvas, id 10; segments numbered from 1 in that order, as :func:`write_digits_coco`'s
        PNGs number them), whether or not the dataset is ``panoptic``. The format of
        :meth:`CocoPanoptic.panoptic_target <detrkit.data.CocoPanoptic.panoptic_target>`
        (void: category -1, though every pixel of a scene has a segment)."""
        from detrkit.data.panoptic import panoptic_target_of

        if index < 0:
            index += self.num_images
        masks, labels, _ = panoptic_segments(self.scene(index))
        return panoptic_target_of(torch.from_numpy(masks), labels.tolist(), masks.shape[1:])


def panoptic_png(segment_ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` as the COCO panoptic PNG's colours: id = R + 256 G + 256^2 B."""
    ids = segment_ids.astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # Level 1: several times faster to write than the default, for slightly larger files.
    picture = Image.fromarray(pixels)
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG", compress_level=1))


def write_digits_coco(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    seed: int = 0,
    overwrite: bool = False,
    masks: bool = False,
) -> dict[str, Path]:
    """Writes the scenes of :class:`DigitsDetection` as a COCO dataset: ``out_dir/train/*.png``,
    ``out_dir/val/*.png`` and ``out_dir/annotations/instances_{train,val}.json`` (category id =
    the digit, name ``"0"``..``"9"``). PNG keeps the pixels, and so the boxes, exact. A dataset
    there already is an error (FileExistsError) unless ``overwrite``.

    ``masks`` adds each digit's exact mask to the instances (``segmentation`` as RLE) and writes
    the panoptic version in COCO's panoptic format: ``annotations/panoptic_{split}.json`` and
    its PNGs in ``annotations/panoptic_{split}/`` (digits as things, the canvas as stuff, id 10).

    Returns the paths of the JSON files: ``train`` and ``val``, and with ``masks``
    ``panoptic_train`` and ``panoptic_val``.
    """
    for name, count in (("num_train", num_train), ("num_val", num_val)):
        if count < 0:
            raise ValueError(f"{name} must be non-negative, got {count}")
    out_dir = Path(out_dir)
    annotations_dir = out_dir / "annotations"
    splits = ("train", "val")
    annotation_files = [annotations_dir / f"instances_{s}.json" for s in splits]
    if masks:
        annotation_files += [annotations_dir / f"panoptic_{s}.json" for s in splits]
    existing_results(annotation_files, str(out_dir), overwrite)
    annotations_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", num_train), ("val", num_val)):
        images_dir = out_dir / split
        images_dir.mkdir(exist_ok=True)
        panoptic_dir = annotations_dir / f"panoptic_{split}"
        if masks:
            panoptic_dir.mkdir(exist_ok=True)
        images, annotations, panoptic = [], [], []
        for index in range(count):
            scene = make_scene(split, index, seed)
            # Named by image id, as COCO names its files: `detrkit predict` reads the id back
            # from the name, so its results score against these annotations. Ids start at 1.
            file_name = f"{index + 1:06d}.png"
            _write_png(images_dir / file_name, scene.image)
            height, width = scene.image.shape[:2]
            images.append(
                {"id": index + 1, "file_name": file_name, "height": height, "width": width}
            )
            for box, label, mask in zip(scene.boxes, scene.labels, scene.masks):
                x1, y1, x2, y2 = (int(v) for v in box)
                annotation = {
                    "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                }
                if masks:
                    annotation["segmentation"] = masks_to_rle(torch.from_numpy(mask[None]))[0]
                annotations.append(annotation)
            if masks:
                segment_masks, labels, boxes = panoptic_segments(scene)
                segment_ids = np.zeros((height, width), dtype=np.uint32)
                segments = []
                for segment_id, (mask, label, box) in enumerate(
                    zip(segment_masks, labels, boxes), start=1
                ):
                    segment_ids[mask] = segment_id
                    x1, y1, x2, y2 = (int(v) for v in box)
                    segments.append(
                        {
                            "id": segment_id,
                            "category_id": int(label),
                            "iscrowd": 0,
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": int(mask.sum()),
                        }
                    )
                _write_png(panoptic_dir / file_name, panoptic_png(segment_ids))
                panoptic.append(
                    {"image_id": index + 1, "file_name": file_name, "segments_info": segments}
                )
        categories = [{"id": i, "name": name} for i, name in enumerate(CLASS_NAMES)]
        coco = {
            "info": {"description": f"detrkit digits, {split} split, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        path = annotations_dir / f"instances_{split}.json"
        write_json(path, coco)
        written[split] = path
        if masks:
            panoptic_categories = [
                {"id": i, "name": name, "isthing": int(name != CANVAS_NAME)}
                for i, name in enumerate(PANOPTIC_CLASS_NAMES)
            ]
            path = annotations_dir / f"panoptic_{split}.json"
            write_json(
                path,
                {
                    "info": {"description": f"detrkit digits panoptic, {split} split, seed {seed}"},
                    "images": images,
                    "annotations": panoptic,
                    "categories": panoptic_categories,
                },
            )
            written[f"panoptic_{split}"] = path
    return written


def digit_crops(
    split: Split, num_images: int, seed: int = 0, side: int = 64
) -> tuple[Tensor, Tensor]:
    """Every digit of the first ``num_images`` scenes of a split, cut out as a square around its
    box (1.1 to 1.6 times its longer side, centre moved by up to 15% of the box, kept inside the
    canvas: the digit in its own background, not centred exactly) and resized to ``side``.

    Returns ``crops`` ``[N, 3, side, side]`` uint8 and ``labels`` ``[N]`` int64 (the digits).
    For backbone pre-training by classification, see :mod:`detrkit.engine.pretrain`.
    """
    _check_split(split)
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], num_images, side])
    crops, labels = [], []
    for index in range(num_images):
        scene = make_scene(split, index, seed)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float()  # [3, H, W]
        height, width = scene.image.shape[:2]
        for (x1, y1, x2, y2), label in zip(scene.boxes.tolist(), scene.labels.tolist()):
            half = max(x2 - x1, y2 - y1) * rng.uniform(1.1, 1.6) / 2
            cx = (x1 + x2) / 2 + rng.uniform(-0.15, 0.15) * (x2 - x1)
            cy = (y1 + y2) / 2 + rng.uniform(-0.15, 0.15) * (y2 - y1)
            left, top = max(0, int(cx - half)), max(0, int(cy - half))
            right, bottom = min(width, int(cx + half) + 1), min(height, int(cy + half) + 1)
            crop = image[None, :, top:bottom, left:right]
            crops.append(F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True))
            labels.append(label)
    if not crops:
        return torch.zeros(0, 3, side, side, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    pixels = torch.cat(crops).round().clamp(0, 255).to(torch.uint8)  # [N, 3, side, side]
    return pixels, torch.tensor(labels, dtype=torch.int64)
