"""Turning raw detector outputs into detections in image coordinates."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from detrkit.models.config import ModelConfig
from detrkit.models.kinds import CLASSIFICATIONS, kind_of

MASK_THRESHOLD = 0.5  # a pixel is in a detection's mask where the sigmoid exceeds this


class PostProcess(nn.Module):
    """Scores, labels and absolute xyxy boxes in each image's original size.

    ``"softmax"`` (DETR): softmax over classes with "no object" dropped; every query gives one
    detection, its best class. ``"sigmoid"`` (Deformable DETR): independent class probabilities;
    the ``num_select`` best (query, class) pairs over all queries and classes.
    """

    def __init__(self, classification: str = "softmax", num_select: int = 100) -> None:
        super().__init__()
        if classification not in CLASSIFICATIONS:
            raise ValueError(
                f"classification must be one of {CLASSIFICATIONS}, got {classification!r}"
            )
        self.classification = classification
        self.num_select = num_select

    @classmethod
    def for_config(cls, config: ModelConfig) -> PostProcess:
        """The post-processing of the original code for this kind of model."""
        return cls(kind_of(config).classification)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """
        Args:
            outputs: the model's output (``pred_logits`` ``[B, Q, C(+1)]``, ``pred_boxes`` ``[B, Q, 4]``).
            target_sizes: ``[B, 2]`` each image's original (height, width).

        Returns:
            per image a dict of ``scores`` ``[K]``, ``labels`` ``[K]``, ``boxes`` ``[K, 4]`` xyxy
            and ``queries`` ``[K]`` (the object query each came from), sorted by query (softmax,
            K = Q) or by score (sigmoid, K = num_select).
        """
        found = self.batched(outputs, target_sizes)
        return [dict(zip(found, values)) for values in zip(*found.values())]

    @torch.no_grad()
    def add_masks(
        self,
        outputs: dict,
        detections: list[dict[str, Tensor]],
        input_size: Sequence[int],
        image_sizes: Sequence[Sequence[int]],
        orig_sizes: Tensor,
        threshold: float = 0.5,
    ) -> list[dict[str, Tensor]]:
        """``detections`` (from :meth:`forward`) with ``masks`` ``[K, H, W]`` bool at each
        image's original size, from a panoptic model's ``pred_masks`` (:func:`instance_masks`).
        ``input_size`` is the padded batch's ``(H, W)``, ``image_sizes`` each image's in it."""
        return [
            {
                **found,
                "masks": instance_masks(masks, found["queries"], input_size, size, orig, threshold),
            }
            for found, masks, size, orig in zip(
                detections, outputs["pred_masks"], image_sizes, orig_sizes.tolist()
            )
        ]

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """``pred_logits`` ``[B, Q, C(+1)]`` -> the probability of every class ``[B, Q, C]``
        ("no object" dropped)."""
        logits = logits.float()
        if self.classification == "softmax":
            return logits.softmax(-1)[..., :-1]
        return logits.sigmoid()

    @torch.no_grad()
    def batched(self, outputs: dict, target_sizes: Tensor) -> dict[str, Tensor]:
        """:meth:`forward` for the whole batch at once: ``scores``, ``labels``, ``queries``
        ``[B, K]`` and ``boxes`` ``[B, K, 4]``. Never splits the batch, so that an exported graph
        keeps its batch size dynamic."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        # shape[0], not len(): len() must return an int, which fixes a traced batch size.
        if logits.shape[0] != target_sizes.shape[0]:
            raise ValueError(
                f"target_sizes has {target_sizes.shape[0]} entries for a batch of {logits.shape[0]}"
            )
        boxes = box_convert(boxes, "cxcywh", "xyxy")  # [B, Q, 4] normalised
        prob = self.class_probabilities(logits)  # [B, Q, C]
        if self.classification == "softmax":
            scores, labels = prob.max(-1)  # [B, Q]
            query = torch.arange(logits.shape[1], device=logits.device).expand_as(labels)
        else:
            batch, _, num_classes = logits.shape
            prob = prob.view(batch, -1)  # [B, Q*C]
            k = min(self.num_select, prob.shape[1])
            scores, index = torch.topk(prob, k, dim=1)  # [B, K]
            labels = index % num_classes
            query = index // num_classes
            boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))  # [B, K, 4]
        height, width = target_sizes.to(boxes.device).float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)  # [B, 4]
        boxes = boxes * scale[:, None, :]
        return {"scores": scores, "labels": labels, "boxes": boxes, "queries": query}


def _image_masks(
    pred_masks: Tensor, input_size: Sequence[int], image_size: Sequence[int]
) -> Tensor:
    """One image's mask logits ``[K, h/4, w/4]`` of the padded batch -> logits ``[K, h, w]`` of
    the image alone: upsampled to the padded input's size, then the padding cut off."""
    logits = F.interpolate(
        pred_masks[:, None].float(), size=tuple(input_size), mode="bilinear", align_corners=False
    )[:, 0]  # [K, H_pad, W_pad]
    height, width = (int(v) for v in image_size)
    return logits[:, :height, :width]


def instance_masks(
    pred_masks: Tensor,
    queries: Tensor,
    input_size: Sequence[int],
    image_size: Sequence[int],
    orig_size: Sequence[int],
    threshold: float = 0.5,
) -> Tensor:
    """The binary masks of one image's detections at its original size, as the original DETR's
    instance post-processing makes them: the query's logits upsampled to the input, thresholded
    at ``threshold`` after a sigmoid, then resized (nearest) to ``orig_size``.

    ``pred_masks`` ``[Q, h/4, w/4]`` this image's mask logits; ``queries`` ``[K]`` the detections'
    queries; ``input_size`` the padded batch's ``(H, W)``; ``image_size`` this image's ``(h, w)``
    in the batch (before padding). Returns ``[K, H_orig, W_orig]`` bool."""
    logits = _image_masks(pred_masks[queries], input_size, image_size)  # [K, h, w]
    binary = (logits.sigmoid() > threshold).float()
    resized = F.interpolate(binary[:, None], size=tuple(int(v) for v in orig_size), mode="nearest")
    return resized[:, 0].bool()  # [K, H_orig, W_orig]


def mask_probabilities(
    pred_masks: Tensor,
    queries: Tensor,
    input_size: Sequence[int],
    image_size: Sequence[int],
    orig_size: Sequence[int],
) -> Tensor:
    """The sigmoid of some queries' mask logits at one image's original size, ``[K, H_orig,
    W_orig]`` float: :func:`instance_masks` before its threshold, resized bilinearly (for
    pictures of what a query sees, not for masks). Arguments as :func:`instance_masks`'s."""
    probabilities = _image_masks(pred_masks[queries], input_size, image_size).sigmoid()
    size = tuple(int(v) for v in orig_size)
    return F.interpolate(probabilities[:, None], size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def panoptic_segmentation(
    logits: Tensor,
    pred_masks: Tensor,
    is_thing: Sequence[bool],
    input_size: Sequence[int],
    image_size: Sequence[int],
    orig_size: Sequence[int],
    threshold: float = 0.85,
    min_area: int = 4,
) -> tuple[Tensor, list[dict]]:
    """One image's panoptic segmentation, as the original DETR makes it.

    Queries whose best class (``no object`` included) is a real class scoring above
    ``threshold`` are kept; each pixel goes to the kept query whose mask logit is highest there;
    the segments of one stuff class merge into one; the map is resized (nearest) to
    ``orig_size``; segments of ``min_area`` pixels or fewer (small, or mostly covered by
    others) are dropped and their pixels given to the rest, until none is left that small.

    ``logits`` ``[Q, C + 1]``, ``pred_masks`` ``[Q, h/4, w/4]`` one image's outputs;
    ``is_thing`` ``[C]`` per label. Returns the segment ids ``[H_orig, W_orig]`` int64 (0 where
    no segment is, numbered from 1 otherwise) and one dict per segment: ``id``, ``label``,
    ``isthing``, ``score`` (the best of its queries) and ``area`` in pixels.
    """
    num_classes = logits.shape[-1] - 1
    if len(is_thing) != num_classes:
        raise ValueError(f"is_thing has {len(is_thing)} entries for {num_classes} classes")
    scores, labels = logits.float().softmax(-1).max(-1)  # [Q]
    keep = (labels != num_classes) & (scores > threshold)
    scores, labels = scores[keep], labels[keep]
    masks = _image_masks(pred_masks[keep], input_size, image_size)  # [K, h, w]
    orig = tuple(int(v) for v in orig_size)
    while True:
        ids, owners = _assign_pixels(masks, labels, is_thing, orig)
        area = torch.bincount(ids.flatten(), minlength=len(owners) + 1)[1:]  # [S]
        small = area <= min_area
        if not small.any():
            break
        # Drop every query of a small segment and assign its pixels again.
        dropped = torch.cat([owners[i] for i in small.nonzero()[:, 0].tolist()])
        kept = torch.ones(len(labels), dtype=torch.bool)
        kept[dropped] = False
        masks, labels, scores = masks[kept], labels[kept], scores[kept]
    segments = [
        {
            "id": index + 1,
            "label": int(labels[queries[0]]),
            "isthing": bool(is_thing[int(labels[queries[0]])]),
            "score": float(scores[queries].max()),
            "area": int(area[index]),
        }
        for index, queries in enumerate(owners)
    ]
    return ids, segments


# The original's panoptic post-processing: queries scoring above 0.85, segments over 4 pixels.
PANOPTIC_THRESHOLD, PANOPTIC_MIN_AREA = 0.85, 4


@dataclass
class Segment:
    """One segment of a panoptic segmentation."""

    id: int  # its value in ``segment_ids`` (from 1)
    label: int  # class index
    name: str
    category_id: int  # the dataset's category id (the label when the model has no mapping)
    isthing: bool  # a thing (one segment per object) or stuff (one segment per class)
    score: float  # the best score of its queries
    area: int  # pixels, in the input image


@dataclass
class PanopticResult:
    """One image's panoptic segmentation: every pixel belongs to one segment or to none."""

    segment_ids: Tensor  # [H, W] int64 at the input image's size: a segment's id, 0 for none
    segments: list[Segment]  # those whose id occurs in segment_ids, by id

    def __len__(self) -> int:
        return len(self.segments)


def check_threshold(threshold: float) -> None:
    """ValueError unless ``threshold`` is a score threshold: a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def check_panoptic_options(threshold: float, min_area: int) -> None:
    """ValueError unless ``threshold`` is a number in [0, 1] and ``min_area`` a whole number of
    pixels, 0 or more."""
    check_threshold(threshold)
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 0:
        raise ValueError(f"min_area must be a whole number of pixels, 0 or more, got {min_area!r}")


def panoptic_result(
    logits: Tensor,
    pred_masks: Tensor,
    is_thing: Sequence[bool],
    sizes: tuple[Sequence[int], Sequence[int], Sequence[int]],
    class_names: Sequence[str],
    category_ids: Sequence[int] | None,
    threshold: float = PANOPTIC_THRESHOLD,
    min_area: int = PANOPTIC_MIN_AREA,
) -> PanopticResult:
    """One image's :func:`panoptic_segmentation` as a :class:`PanopticResult`, its segments
    named. ``sizes``: the padded input's, the image's resized and its own ``(H, W)``;
    ``category_ids``: the dataset's id of each class (None: the label is the id)."""
    segment_ids, segments = panoptic_segmentation(
        logits, pred_masks, is_thing, *sizes, threshold, min_area
    )
    kept = [
        Segment(
            id=segment["id"],
            label=segment["label"],
            name=class_names[segment["label"]],
            category_id=int(category_ids[segment["label"]] if category_ids else segment["label"]),
            isthing=segment["isthing"],
            score=segment["score"],
            area=segment["area"],
        )
        for segment in segments
        if segment["area"] > 0  # numbered, but every pixel lost to the resize
    ]
    return PanopticResult(segment_ids, kept)


def _assign_pixels(
    masks: Tensor, labels: Tensor, is_thing: Sequence[bool], orig_size: tuple[int, int]
) -> tuple[Tensor, list[Tensor]]:
    """Each pixel to the query of highest logit, the queries of one stuff class as one segment.
    Returns segment ids ``[H_orig, W_orig]`` (from 1; 0 without queries) and, per segment, the
    indices of its queries."""
    if len(labels) == 0:
        return torch.zeros(orig_size, dtype=torch.int64), []
    winner = masks.argmax(0)  # [h, w] the query whose logit is highest
    owners: list[Tensor] = []
    segment_of = torch.empty(len(labels), dtype=torch.int64)
    for query in range(len(labels)):
        label = int(labels[query])
        if not is_thing[label]:
            earlier = [s for s, members in enumerate(owners) if int(labels[members[0]]) == label]
            if earlier:
                owners[earlier[0]] = torch.cat([owners[earlier[0]], torch.tensor([query])])
                segment_of[query] = earlier[0] + 1
                continue
        owners.append(torch.tensor([query]))
        segment_of[query] = len(owners)
    ids = segment_of[winner]  # [h, w]
    ids = F.interpolate(ids[None, None].float(), size=orig_size, mode="nearest")[0, 0].long()
    # A segment may have lost every pixel to the resize; it is numbered still, and has area 0.
    return ids, owners


@dataclass
class Detections:
    """One image's detections, best first."""

    boxes: Tensor  # [K, 4] absolute x1, y1, x2, y2 in the input image's pixels
    scores: Tensor  # [K]
    labels: Tensor  # [K] class indices
    names: list[str]  # K class names
    queries: Tensor  # [K] the object query each detection came from
    image_size: tuple[int, int]  # the input image's (height, width)
    # [K, H, W] bool at the input image's size: each detection's mask (panoptic models), or None
    masks: Tensor | None = None
    # [K] the dataset's category id of each detection (its label when the model has no mapping,
    # as for COCO's 91 classes, whose indices are the category ids)
    category_ids: Tensor | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def captions(self) -> list[str]:
        """ "name score" per detection, as drawn on pictures."""
        return [f"{name} {score:.2f}" for name, score in zip(self.names, self.scores.tolist())]

    def as_dict(self) -> dict[str, Tensor]:
        """The ``boxes`` / ``scores`` / ``labels`` dict that PostProcess returns, with ``masks``
        when there are masks (as :meth:`PostProcess.add_masks` adds them)."""
        found = {"boxes": self.boxes, "scores": self.scores, "labels": self.labels}
        if self.masks is not None:
            found["masks"] = self.masks
        return found


def select_detections(
    found: dict[str, Tensor],
    threshold: float,
    class_names: Sequence[str],
    image_size: tuple[int, int],
    category_ids: Sequence[int] | None = None,
    masks: Callable[[Tensor], Tensor] | None = None,
) -> Detections:
    """One image's post-processed ``scores``, ``labels``, ``boxes`` and ``queries`` ``[K]``
    (:meth:`PostProcess.forward`'s, or an exported graph's) -> its :class:`Detections` scoring at
    least ``threshold``, best first (ties in their given order), on the CPU. ``masks`` takes the
    indices of the kept rows and returns their masks at ``image_size`` (:func:`instance_masks`);
    without it there are none. ``category_ids`` maps labels to the dataset's ids."""
    scores = found["scores"]
    # Best first: DETR's post-processing lists detections in query order.
    keep = torch.nonzero(scores >= threshold).squeeze(1)
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    labels = found["labels"][keep].cpu()
    if category_ids is None:
        ids = labels.clone()
    else:
        ids = torch.tensor([int(category_ids[int(label)]) for label in labels], dtype=torch.int64)
    return Detections(
        boxes=found["boxes"][keep].cpu(),
        scores=scores[keep].cpu(),
        labels=labels,
        names=[class_names[int(label)] for label in labels],
        queries=found["queries"][keep].cpu(),
        image_size=tuple(image_size),
        masks=masks(keep) if masks is not None else None,
        category_ids=ids,
    )
