"""The datasets and loaders a training or evaluation run reads, from its ``data`` string."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detrkit.data import (
    AugmentationConfig,
    CocoDetection,
    CocoPanoptic,
    DigitsDetection,
    collate_fn,
    make_train_transforms,
    make_val_transforms,
    require_trainable,
)
from detrkit.data.coco import masks_to_rle
from detrkit.data.formats import format_dataset, is_format_data
from detrkit.engine.config import DIGITS_DATA, TrainConfig, is_panoptic_data


def build_datasets(config: TrainConfig, masks: bool = False) -> tuple[Dataset, Dataset]:
    """Train and validation datasets, augmented at ``image_scale`` times the original sizes.
    With ``masks`` (a panoptic model) the targets carry masks: the digits' panoptic version
    (the canvas as stuff), or the COCO instances' segmentations; the panoptic forms of
    ``data`` always do."""
    augment = AugmentationConfig().scaled(config.image_scale)
    val_transforms = make_val_transforms(augment)
    train_transforms = make_train_transforms(augment) if config.augment else val_transforms
    if config.data in DIGITS_DATA:
        panoptic = masks or is_panoptic_data(config.data)
        train_set = DigitsDetection(
            "train", config.digits_train, config.seed, train_transforms, panoptic=panoptic
        )
        require_trainable(train_set, "the digits training set")
        val_set = DigitsDetection(
            "val", config.digits_val, config.seed, val_transforms, panoptic=panoptic
        )
        return train_set, val_set
    mapping = config.label_mapping
    if is_format_data(config.data):  # voc:ROOT, yolo:DATA_YAML
        train_set = format_dataset(config.data, "train", train_transforms, mapping, masks=masks)
        require_trainable(train_set)
        val_set = format_dataset(
            config.data, "val", val_transforms, mapping, skip_unreadable=False, masks=masks
        )
        return train_set, val_set
    train_images, train_json, val_images, val_json = config.coco_paths()
    if is_panoptic_data(config.data):
        train_set = CocoPanoptic(
            train_images, train_json, None, train_transforms, mapping, skip_unreadable=True
        )
        val_set = CocoPanoptic(val_images, val_json, None, val_transforms, mapping)
        require_trainable(train_set, train_json)
        return train_set, val_set
    train_set = CocoDetection(
        train_images, train_json, train_transforms, label_mapping=mapping, masks=masks
    )
    # Refused now rather than after an epoch of zero steps or of background only.
    require_trainable(train_set)
    # Evaluated on: every image must be read (see CocoDetection's skip_unreadable).
    val_set = CocoDetection(
        val_images,
        val_json,
        val_transforms,
        label_mapping=mapping,
        skip_unreadable=False,
        masks=masks,
    )
    return train_set, val_set


def coco_ground_truth(dataset: Dataset):
    """The dataset's annotations as a pycocotools COCO object, for COCOeval."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    if isinstance(dataset, CocoDetection) and dataset.coco is not None:  # built in memory
        import contextlib
        import copy
        import io

        coco = COCO()
        coco.dataset = copy.deepcopy(dataset.coco)  # COCOeval adds fields to the annotations
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco
    if isinstance(dataset, CocoDetection):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(dataset.annotations_json))
    if isinstance(dataset, CocoPanoptic):
        return _panoptic_instances(dataset)
    images, annotations = [], []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        height, width = scene.image.shape[:2]
        images.append({"id": index + 1, "height": height, "width": width})
        rles = masks_to_rle(torch.from_numpy(scene.masks))
        for box, label, rle in zip(scene.boxes.tolist(), scene.labels.tolist(), rles):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    # The digits' exact masks, for mask AP; the canvas (panoptic) is not an
                    # instance.
                    "segmentation": rle,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(dataset.class_names)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco


def _panoptic_instances(dataset: CocoPanoptic):
    """A panoptic set's things as COCO instances (boxes and RLE masks of their segments), for
    box and mask AP."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    things = {i for i, thing in zip(dataset.category_ids, dataset.is_thing) if thing}
    images, annotations = [], []
    for index, image_id in enumerate(dataset.image_ids):
        target = dataset.panoptic_target(index)  # [H, W, 2] (category id, segment id)
        height, width = target.shape[:2]
        images.append({"id": int(image_id), "height": height, "width": width})
        for category, segment in target.flatten(0, 1).unique(dim=0).tolist():
            if category not in things:
                continue
            mask = (target[..., 0] == category) & (target[..., 1] == segment)
            rle = masks_to_rle(mask[None])[0]
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": int(category),
                    "bbox": [x, y, w, h],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    names = dict(zip(dataset.category_ids, dataset.class_names))
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(i), "name": name} for i, name in names.items()],
    }
    coco.createIndex()
    return coco


# Edges of the aspect-ratio (width / height) groups: images of one group pad little when
# batched, as the validation resize gives them about the same shape.
ASPECT_EDGES = (0.5, 0.625, 0.75, 0.875, 1.0, 1.0 / 0.875, 1.0 / 0.75, 1.0 / 0.625, 2.0)

# In evaluation a batch also holds only images whose aspect ratios are within this factor of
# each other: Deformable DETR's outputs move with even a few percent of padding, and evaluation
# should score what one image at a time scores (docs/training.md, "Grouped batches").
EVAL_RATIO_SPREAD = 1.02


def aspect_ratios(dataset: Dataset) -> list[float]:
    """Each item's width / height, from the dataset's ``image_size(index)`` (1 where unknown)."""
    sizes = [dataset.image_size(index) for index in range(len(dataset))]
    return [1.0 if size is None else size[1] / size[0] for size in sizes]


def aspect_groups(ratios: list[float]) -> list[int]:
    """Each aspect ratio's group: the bin of :data:`ASPECT_EDGES` it falls in."""
    return torch.bucketize(torch.tensor(ratios), torch.tensor(ASPECT_EDGES)).tolist()


class EpochBatches(torch.utils.data.Sampler):
    """Batches of one epoch in an order fixed by (seed, epoch), this process's share when
    distributed, starting at ``start`` batches in (to resume an interrupted epoch).

    With ``ratios`` (each item's aspect ratio), a batch holds images of one shape. Shuffled
    (training), as detectron2 groups them: items are taken in the epoch's order and a batch is
    formed as soon as its group (:func:`aspect_groups`) has ``batch_size`` of them; what is left
    of each group ends the epoch in smaller batches. In order (evaluation): the items sorted by
    ratio, in batches of consecutive ones whose ratios are within :data:`EVAL_RATIO_SPREAD` of
    each other. The batches are made for all processes at once and
    dealt out in turn, repeated from the start to an equal count each, so that every process
    takes the same number of steps."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        ratios: list[float] | None = None,
    ) -> None:
        self.sampler = DistributedSampler(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.batch_size = batch_size
        self.ratios = ratios
        self.seed, self.shuffle = seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.start = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def _batches(self) -> list[list[int]]:
        if self.ratios is None:
            indices = list(self.sampler)
            return [
                indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)
            ]
        size = self.batch_size
        if self.shuffle:  # the order DistributedSampler draws, before it splits the processes
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.ratios), generator=generator).tolist()
            groups = aspect_groups(self.ratios)
            pending: dict[int, list[int]] = {}
            batches = []
            for index in order:
                group = pending.setdefault(groups[index], [])
                group.append(index)
                if len(group) == size:
                    batches.append(group.copy())
                    group.clear()
            batches += [group for group in pending.values() if group]
        else:
            order = sorted(range(len(self.ratios)), key=self.ratios.__getitem__)
            batches = []
            for index in order:
                batch = batches[-1] if batches else None
                if (
                    batch is not None
                    and len(batch) < size
                    and self.ratios[index] <= self.ratios[batch[0]] * EVAL_RATIO_SPREAD
                ):
                    batch.append(index)
                else:
                    batches.append([index])
        count = -(-len(batches) // self.num_replicas) * self.num_replicas  # a multiple
        batches = [batches[i % len(batches)] for i in range(count)] if batches else []
        return batches[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self._batches()[self.start :])

    def __len__(self) -> int:
        if self.ratios is None:
            return (len(self.sampler) + self.batch_size - 1) // self.batch_size - self.start
        return len(self._batches()) - self.start


class SeededSamples(Dataset):
    """Draws each sample's augmentation from a generator seeded by (seed, epoch, index): the
    same sample comes out the same whatever the worker count, the process or a resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
            return self.dataset[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    shuffle: bool,
    workers: int,
    num_replicas: int = 1,
    rank: int = 0,
    group_by_aspect: bool = False,
) -> DataLoader:
    """A loader of ``(images, mask, targets)`` whose ``batch_sampler`` is an
    :class:`EpochBatches`; ``group_by_aspect`` batches images of similar aspect ratio together
    (less padding; see :class:`EpochBatches`)."""
    ratios = aspect_ratios(_base(dataset)) if group_by_aspect else None
    batches = EpochBatches(dataset, batch_size, seed, shuffle, num_replicas, rank, ratios)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an epoch must not draw from the global stream that
        # dropout uses, or a run resumed mid-epoch would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


def _base(dataset: Dataset) -> Dataset:
    """The dataset under a :class:`SeededSamples` wrapper (the one that knows image sizes)."""
    return dataset.dataset if isinstance(dataset, SeededSamples) else dataset
