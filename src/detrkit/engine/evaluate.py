"""Evaluation: COCO box and mask AP with pycocotools (the 12 standard numbers, as fractions in
[0, 1]) and panoptic quality (PQ, SQ, RQ; all, things, stuff) with torchmetrics' matching."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from detrkit.checkpoints.finite import require_finite_outputs
from detrkit.data.coco import to_coco_results
from detrkit.data.panoptic import pq_categories
from detrkit.engine.config import AMP_CHOICES
from detrkit.models.postprocess import panoptic_segmentation
from detrkit.ops import native_bf16

# --amp choices -> the dtype torch.autocast runs the model in (None: full precision); "auto"
# resolves to one of them on the device the run uses (:func:`amp_dtype`).
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The dtype an ``--amp`` choice runs the model in on ``device`` (None: full precision).
    "auto" is bf16 where the device computes it in hardware, full precision elsewhere: emulated
    bf16 is slower than float32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
    return AUTOCAST_DTYPES[amp]


def amp_auto_note(device: torch.device) -> str:
    """What ``--amp auto`` chooses on ``device``, as a run's log says it."""
    chosen = "bf16" if native_bf16(device) else "off (no bf16 in hardware)"
    return f"mixed precision (amp auto): {chosen} on {device}"


COCO_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def coco_metrics(coco_gt, results: list[dict], iou_type: str = "bbox") -> dict[str, float | None]:
    """COCOeval's 12 numbers for ``results`` against the ground truth ``coco_gt`` (a pycocotools
    COCO): of the boxes (``iou_type="bbox"``) or of the masks (``"segm"``: results and ground
    truth need ``segmentation``). Numbers pycocotools cannot compute (no objects of a size) are
    None."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes refuses an empty list; no detections score 0 where there are objects
            coco_dt = COCO()
            coco_dt.dataset = {**coco_gt.dataset, "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        name: (None if value < 0 else float(value))
        for name, value in zip(COCO_METRICS, evaluator.stats)
    }


def gather_results(results: list[dict]) -> list[dict]:
    """All processes' results on every process (identity without torch.distributed), each image
    once (:func:`merge_rank_results`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return results
    gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, results)
    return merge_rank_results(gathered)


def merge_rank_results(parts: Sequence[list[dict]]) -> list[dict]:
    """The processes' COCO results as one list, an image's entries taken from the first process
    that has any. ``DistributedSampler`` pads the processes' shares to equal length by repeating
    images; counted twice, a repeated image's detections would be false positives."""
    merged: list[dict] = []
    earlier: set[int] = set()
    for part in parts:
        merged.extend(entry for entry in part if entry["image_id"] not in earlier)
        earlier.update(entry["image_id"] for entry in part)
    return merged


def merge_image_counts(parts: Sequence[dict[int, Tensor]]) -> dict[int, Tensor]:
    """The processes' per-image panoptic counts as one dict, an image's taken from the first
    process that has it (as :func:`merge_rank_results` takes COCO results)."""
    merged: dict[int, Tensor] = {}
    for part in parts:
        for image_id, counts in part.items():
            merged.setdefault(image_id, counts)
    return merged


class PanopticScore:
    """Panoptic quality over a dataset (Kirillov et al., 2019): PQ, SQ and RQ of all classes,
    of the things and of the stuff, as fractions, counted as COCO's panopticapi counts them.

    A predicted and a true segment of one category match when their IoU is above 0.5, the
    pixels where the truth is void left out of the union. An unmatched true segment is a false
    negative; an unmatched predicted one a false positive, unless more than half of it lies on
    void. PQ averages over the categories that have any segment. ``things`` and ``stuff`` are
    category ids; pixels of any other category (-1 by convention) are void, crowd regions
    included (panopticapi discounts a crowd region only for its own category).

    torchmetrics' ``PanopticQuality`` gives the same numbers where predictions leave no pixel
    void (tested); it also ignores a true segment that a prediction leaves mostly void, which
    would let a model that predicts nothing score no false negatives.
    """

    def __init__(self, things: Sequence[int], stuff: Sequence[int]) -> None:
        self.things, self.stuff = sorted(things), sorted(stuff)
        self.categories = self.things + self.stuff
        count = len(self.categories)
        # Per category (things, then stuff): IoU sum of matches, true/false positives, misses;
        # of images given without an id, and of each image given with one.
        self.stats = torch.zeros(4, count, dtype=torch.float64)
        self.per_image: dict[int, Tensor] = {}

    def _keys(self, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """One int per pixel for its segment (-1 for void) and the category index of each."""
        lookup = {category: index for index, category in enumerate(self.categories)}
        category = pairs[..., 0].flatten()
        index = torch.tensor([lookup.get(int(c), -1) for c in range(int(category.max()) + 2)])
        category_index = torch.where(category >= 0, index[category.clamp(min=0)], -1)
        segment = pairs[..., 1].flatten()
        keys = category_index * (int(segment.max()) + 1) + segment
        return torch.where(category_index >= 0, keys, -1), category_index

    def update(self, prediction: Tensor, target: Tensor, image_id: int | None = None) -> None:
        """One image: ``prediction`` and ``target`` ``[H, W, 2]`` int64 pairs of (category id,
        segment id), segment ids telling apart the things of one category. With an
        ``image_id``, an image scored before (here or, when distributed, by another process: a
        ``DistributedSampler`` repeats images to even out the shares) counts once."""
        if image_id is not None and image_id in self.per_image:
            return
        counts = torch.zeros_like(self.stats)
        self._count(prediction, target, counts)
        if image_id is None:
            self.stats += counts
        else:
            self.per_image[image_id] = counts

    def _count(self, prediction: Tensor, target: Tensor, counts: Tensor) -> None:
        """Adds one image's IoU sums, true and false positives and misses into ``counts``."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"a panoptic prediction of {tuple(prediction.shape)} for a target of "
                f"{tuple(target.shape)}"
            )
        pred_key, pred_category = self._keys(prediction)
        true_key, true_category = self._keys(target)
        pred_ids, pred_area = pred_key.unique(return_counts=True)
        true_ids, true_area = true_key.unique(return_counts=True)
        category_of = {
            **dict(zip(pred_key.tolist(), pred_category.tolist())),
            **dict(zip(true_key.tolist(), true_category.tolist())),
        }
        pairs, overlap = torch.stack([true_key, pred_key]).unique(dim=1, return_counts=True)
        overlaps = dict(zip(map(tuple, pairs.T.tolist()), overlap.tolist()))
        pred_areas = dict(zip(pred_ids.tolist(), pred_area.tolist()))
        true_areas = dict(zip(true_ids.tolist(), true_area.tolist()))
        matched_pred, matched_true = set(), set()
        for (true, pred), intersection in overlaps.items():
            if true < 0 or pred < 0 or category_of[true] != category_of[pred]:
                continue
            on_void = overlaps.get((-1, pred), 0)
            union = pred_areas[pred] + true_areas[true] - intersection - on_void
            iou = intersection / union
            if iou > 0.5:  # at most one match per segment, as IoU > 0.5 is exclusive
                matched_pred.add(pred)
                matched_true.add(true)
                counts[0, category_of[true]] += iou
                counts[1, category_of[true]] += 1
        for true in true_areas:
            if true >= 0 and true not in matched_true:
                counts[3, category_of[true]] += 1
        for pred, area in pred_areas.items():
            mostly_void = overlaps.get((-1, pred), 0) / area > 0.5
            if pred >= 0 and pred not in matched_pred and not mostly_void:
                counts[2, category_of[pred]] += 1

    def compute(self) -> dict[str, float | None]:
        """``PQ``, ``SQ``, ``RQ`` and the same of things (``_th``) and stuff (``_st``); None for
        a group without any segment. Summed over the processes when distributed."""
        stats = self.stats.clone()
        per_image = [self.per_image]
        if dist.is_available() and dist.is_initialized():
            stats = stats.to(_collective_device())
            dist.all_reduce(stats)
            stats = stats.cpu()
            per_image = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(per_image, self.per_image)
        for counts in merge_image_counts(per_image).values():
            stats += counts
        iou, tp, fp, fn = stats
        groups = {
            "": slice(None),
            "_th": slice(0, len(self.things)),
            "_st": slice(len(self.things), None),
        }
        numbers: dict[str, float | None] = {}
        for suffix, group in groups.items():
            counted = (tp + fp + fn)[group] > 0
            if not counted.any():
                numbers.update({f"{name}{suffix}": None for name in ("PQ", "SQ", "RQ")})
                continue
            class_tp = tp[group][counted]
            sq = torch.where(class_tp > 0, iou[group][counted] / class_tp.clamp(min=1), 0.0)
            rq = class_tp / (class_tp + 0.5 * fp[group][counted] + 0.5 * fn[group][counted])
            numbers[f"PQ{suffix}"] = float((sq * rq).mean())
            numbers[f"SQ{suffix}"] = float(sq.mean())
            numbers[f"RQ{suffix}"] = float(rq.mean())
        return numbers


def _collective_device() -> torch.device:
    """Where torch.distributed's collectives run: the GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def panoptic_pairs(
    segment_ids: Tensor, segments: list[dict], category_ids: Sequence[int] | None = None
) -> Tensor:
    """A panoptic segmentation (segment ids ``[H, W]``, 0 for none, and its segments with their
    ``label``) as ``[H, W, 2]`` pairs of (category id, segment id); -1 where no segment is."""
    category = torch.full((len(segments) + 1,), -1, dtype=torch.int64)
    for segment in segments:
        label = segment["label"]
        category[segment["id"]] = category_ids[label] if category_ids is not None else label
    return torch.stack([category[segment_ids], segment_ids], dim=-1)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    batches: Iterable,
    postprocess: nn.Module,
    category_ids: Sequence[int] | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    panoptic: tuple[PanopticScore, Callable[[int], Tensor], Sequence[bool]] | None = None,
) -> list[dict]:
    """COCO results of ``model`` on every batch ``(images, mask, targets)``; targets need
    ``image_id``, ``orig_size`` (h, w) and ``size`` (the image's in the batch). A model with
    masks adds each detection's ``segmentation`` (RLE) to its result.

    ``panoptic``: (score, the target ``[H, W, 2]`` of an image id, ``is_thing`` per label): each
    image's panoptic segmentation is scored into ``score``."""
    model.eval()
    results = []
    for images, mask, targets in batches:
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = model(images, mask)
        # pycocotools would count NaN boxes as matches: a diverged model must not score.
        require_finite_outputs(outputs, f"images {[int(t['image_id']) for t in targets]}")
        orig_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(device)
        found = postprocess(outputs, orig_sizes)
        if "pred_masks" in outputs:
            image_sizes = [t["size"] for t in targets]
            found = postprocess.add_masks(
                outputs, found, images.shape[-2:], image_sizes, orig_sizes
            )
        for index, (target, detections) in enumerate(zip(targets, found)):
            image_id = int(target["image_id"])
            results.extend(to_coco_results(image_id, detections, category_ids))
            if panoptic is not None:
                score, target_of, is_thing = panoptic
                segment_ids, segments = panoptic_segmentation(
                    outputs["pred_logits"][index].cpu(),
                    outputs["pred_masks"][index].cpu(),
                    is_thing,
                    images.shape[-2:],
                    target["size"].tolist(),
                    target["orig_size"].tolist(),
                )
                score.update(
                    panoptic_pairs(segment_ids, segments, category_ids),
                    target_of(image_id),
                    image_id,
                )
    return results


def score_dataset(
    model: nn.Module,
    loader: Iterable,
    dataset,
    coco_gt,
    postprocess: nn.Module,
    category_ids: Sequence[int] | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[dict[str, float | None], list[dict]]:
    """The model's COCO numbers on ``dataset`` and its results: box AP; for a model with masks
    also mask AP (``mask_AP``...) and, on a dataset with ``panoptic_target``, panoptic quality
    (``PQ``, ``SQ``, ``RQ``, things ``_th`` and stuff ``_st``). Rank 0 gets every number (the
    others an empty dict); the results are this process's."""
    with_masks = getattr(model.config, "model_type", None) == "detr_segmentation"
    panoptic = None
    if with_masks and hasattr(dataset, "panoptic_target"):
        score = PanopticScore(*pq_categories(dataset))
        positions = {int(image_id): i for i, image_id in enumerate(dataset_image_ids(dataset))}

        def target_of(image_id: int) -> Tensor:
            return dataset.panoptic_target(positions[image_id])

        panoptic = (score, target_of, list(dataset.is_thing))
    results = predict_dataset(
        model, loader, postprocess, category_ids, device, autocast_dtype, panoptic
    )
    results = gather_results(results)
    numbers = {}
    if panoptic is not None:  # every process takes part in the sync
        numbers.update(panoptic[0].compute())
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}, results
    numbers = {**coco_metrics(coco_gt, results), **numbers}
    if with_masks:
        segm = coco_metrics(coco_gt, results, "segm")
        numbers.update({f"mask_{name}": value for name, value in segm.items()})
    return numbers, results


def dataset_image_ids(dataset) -> list[int]:
    """The image id of each item of ``dataset``: its ``image_ids``, else 1, 2, ... (the
    digits)."""
    return list(getattr(dataset, "image_ids", range(1, len(dataset) + 1)))


def headline(numbers: dict[str, float | None]) -> str:
    """The numbers a log line shows: box AP, AP50, AP75, and mask AP and PQ where measured."""
    shown = ["AP", "AP50", "AP75", "mask_AP", "mask_AP50", "PQ", "PQ_th", "PQ_st"]
    return "  ".join(f"{name} {numbers[name] or 0:.3f}" for name in shown if name in numbers)
