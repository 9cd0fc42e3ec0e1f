"""Throughput of detrkit's training data pipeline against a hand-written Pillow one.

    python benchmarks/data_loading.py [--images 200] [--workers 0 2] [--threads 1] [--repeats 3]

Writes ``--images`` 640x480 JPEGs (shapes on a gradient, with mild noise) and a COCO JSON to a
temporary directory, then loads them for one warm-up epoch and one timed epoch, ``--repeats``
times alternately, with:

- detrkit: CocoDetection (torchvision decoding) + make_train_transforms (transforms v2);
- pillow: the same augmentations written by hand, as the original DETR does them: PIL decode,
  flip, resize and crop with PIL, boxes with numpy, then to a float tensor and normalised.

Both use collate_fn and the same DataLoader settings. Prints each one's best images/s and the
ratio detrkit / pillow.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from detrkit.data import AugmentationConfig, CocoDetection, collate_fn, make_train_transforms
from detrkit.data.transforms import resized_shape

HEIGHT, WIDTH = 480, 640


def write_dataset(directory: Path, count: int) -> Path:
    """``count`` JPEGs with 3 to 8 filled rectangles each (the boxes) and their COCO JSON."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, WIDTH, dtype=np.float32)[None, :, None]
    images, annotations = [], []
    for index in range(count):
        start, stop = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        canvas = start + (stop - start) * ramp + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
        pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(3, 9))):
            w, h = (int(v) for v in rng.integers(20, 200, 2))
            x, y = int(rng.integers(0, WIDTH - w)), int(rng.integers(0, HEIGHT - h))
            draw.rectangle(
                [x, y, x + w - 1, y + h - 1], fill=tuple(int(c) for c in rng.integers(0, 256, 3))
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        name = f"{index:04d}.jpg"
        pil.save(directory / name, quality=90)
        images.append({"id": index + 1, "file_name": name, "height": HEIGHT, "width": WIDTH})
    path = directory / "instances.json"
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    path.write_text(json.dumps(coco))
    return path


class PillowDetection(Dataset):
    """The baseline: the original DETR's style of loading, written by hand."""

    def __init__(self, images_dir: Path, annotations_json: Path, config: AugmentationConfig):
        data = json.loads(annotations_json.read_text())
        self.images_dir = images_dir
        self.config = config
        self.files = {image["id"]: image["file_name"] for image in data["images"]}
        self.ids = sorted(self.files)
        self.boxes: dict[int, list[list[float]]] = {image_id: [] for image_id in self.ids}
        for annotation in data["annotations"]:
            x, y, w, h = annotation["bbox"]
            self.boxes[annotation["image_id"]].append([x, y, x + w, y + h])
        self.mean = torch.tensor(config.mean)[:, None, None]
        self.std = torch.tensor(config.std)[:, None, None]

    def __len__(self) -> int:
        return len(self.ids)

    def resize(self, image: Image.Image, boxes: np.ndarray, sizes, max_size=None):
        short_side = random.choice(sizes)
        height, width = resized_shape(image.height, image.width, short_side, max_size)
        scale = np.array([width / image.width, height / image.height] * 2, dtype=np.float32)
        return image.resize((width, height), Image.Resampling.BILINEAR), boxes * scale

    def crop(self, image: Image.Image, boxes: np.ndarray):
        config = self.config
        width = random.randint(
            min(config.crop_min_size, image.width), min(image.width, config.crop_max_size)
        )
        height = random.randint(
            min(config.crop_min_size, image.height), min(image.height, config.crop_max_size)
        )
        top, left = random.randint(0, image.height - height), random.randint(0, image.width - width)
        image = image.crop((left, top, left + width, top + height))
        boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        return image, boxes

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        with Image.open(self.images_dir / self.files[image_id]) as pil:
            image = pil.convert("RGB")
        boxes = np.array(self.boxes[image_id], dtype=np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.height)
        labels = np.zeros(len(boxes), dtype=np.int64)
        config = self.config
        if random.random() < config.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], dtype=np.float32)
            boxes += np.array([image.width, 0, image.width, 0], dtype=np.float32)
        if random.random() < 0.5:
            image, boxes = self.resize(image, boxes, config.scales, config.max_size)
        else:
            image, boxes = self.resize(image, boxes, config.crop_resize_sizes)
            image, boxes = self.crop(image, boxes)
            image, boxes = self.resize(image, boxes, config.scales, config.max_size)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes, labels = boxes[keep], labels[keep]
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W] uint8
        tensor = (tensor.float().div_(255) - self.mean) / self.std
        size = np.array([image.width, image.height] * 2, dtype=np.float32)
        cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
        target = {
            "boxes": torch.from_numpy(cxcywh / size),
            "labels": torch.from_numpy(labels),
            "size": torch.tensor([image.height, image.width]),
        }
        return tensor, target


def seed_worker(worker_id: int) -> None:
    # Python's random is not reseeded per worker by PyTorch for the forked copies' benefit.
    random.seed(torch.initial_seed() % 2**32)


def images_per_second(dataset: Dataset, workers: int, batch_size: int) -> float:
    torch.manual_seed(0)
    random.seed(0)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
    )
    for _ in loader:  # warm-up epoch: worker start-up, caches
        pass
    start = time.perf_counter()
    count = sum(len(targets) for _, _, targets in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, best kept")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = AugmentationConfig()
    print(
        f"torch {torch.__version__}, {args.threads} torch threads, {os.cpu_count()} CPUs, "
        f"{args.images} JPEGs {WIDTH}x{HEIGHT}, batch {args.batch_size}, default DETR augmentations"
    )
    with tempfile.TemporaryDirectory() as directory:
        annotations = write_dataset(Path(directory), args.images)
        datasets = {
            "detrkit": CocoDetection(
                directory, annotations, transforms=make_train_transforms(config)
            ),
            "pillow": PillowDetection(Path(directory), annotations, config),
        }
        print(
            f"{'workers':>7s} {'detrkit img/s':>14s} {'pillow img/s':>13s} {'detrkit/pillow':>15s}"
        )
        for workers in args.workers:
            # Alternate the pipelines and keep each one's best run: on a shared machine, other
            # jobs only ever slow a run down.
            rates = dict.fromkeys(datasets, 0.0)
            for _ in range(args.repeats):
                for name, dataset in datasets.items():
                    rate = images_per_second(dataset, workers, args.batch_size)
                    rates[name] = max(rates[name], rate)
            ratio = rates["detrkit"] / rates["pillow"]
            print(f"{workers:7d} {rates['detrkit']:14.1f} {rates['pillow']:13.1f} {ratio:14.2f}x")


if __name__ == "__main__":
    main()
