"""DETR's set prediction loss: classification of every query, box regression of matched ones."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from detrkit.loss.matcher import HungarianMatcher

DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def num_boxes_across_processes(targets: list[dict], device: torch.device) -> float:
    """The average number of target boxes per process, at least 1: the loss normaliser.

    Averaged over distributed processes so that every process normalises its share of the
    global batch by the same number.
    """
    num_boxes = torch.tensor(
        [sum(len(t["labels"]) for t in targets)], dtype=torch.float, device=device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        num_boxes /= dist.get_world_size()
    return num_boxes.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Matches predictions to targets, then computes for the final and every auxiliary output:

    - ``loss_ce``: cross-entropy over all queries, unmatched ones labelled "no object" (weighted by
      ``eos_coef`` to offset their majority);
    - ``loss_bbox`` / ``loss_giou``: L1 and 1 - GIoU of matched boxes, per target box;
    and, for logging only, ``class_error`` (% of matched queries misclassified) and
    ``cardinality_error`` (|predicted objects - true objects| per image).

    Auxiliary losses carry the decoder layer index as suffix (``loss_ce_0``). ``"loss"`` is the
    weighted total to back-propagate.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        eos_coef: float = 0.1,
        weight_dict: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.eos_coef = eos_coef
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        aux_outputs = outputs.get("aux_outputs", [])
        suffixes = [""] + [f"_{i}" for i in range(len(aux_outputs))]
        losses: dict[str, Tensor] = {}
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float)
        for layer_outputs, suffix in zip([outputs, *aux_outputs], suffixes):
            layer = self.layer_losses(layer_outputs, targets, num_boxes)
            total = total + sum(weight * layer[name] for name, weight in self.weight_dict.items())
            # Auxiliary layers report only their weighted losses; the logging metrics are final's.
            losses.update(
                {
                    name + suffix: value
                    for name, value in layer.items()
                    if not suffix or name in self.weight_dict
                }
            )
        with torch.no_grad():
            losses["cardinality_error"] = self.cardinality_error(outputs, targets)
        losses["loss"] = total
        return losses

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        """The losses of one decoder layer's predictions (matching included)."""
        indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
        pred_idx = torch.cat([pred for pred, _ in indices])
        device = outputs["pred_logits"].device
        batch_idx, pred_idx = batch_idx.to(device), pred_idx.to(device)

        # Classification: every query has a target class, "no object" (= num_classes) by default.
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )
        target_classes[batch_idx, pred_idx] = matched_labels.to(device)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight)

        # Boxes: only matched queries, normalised by the number of target boxes.
        src_boxes = outputs["pred_boxes"][batch_idx, pred_idx].float()  # [T, 4] cx, cy, w, h
        tgt_boxes = (
            torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(device).float()
        )
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(
            generalized_box_iou(
                box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
            )
        )
        loss_giou = (1 - giou).sum() / num_boxes

        with torch.no_grad():
            if len(matched_labels):
                accuracy = (
                    logits[batch_idx, pred_idx].argmax(-1) == target_classes[batch_idx, pred_idx]
                ).float().mean() * 100
                class_error = 100 - accuracy
            else:
                class_error = logits.new_zeros(())
        return {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "class_error": class_error,
        }

    @staticmethod
    def cardinality_error(outputs: dict, targets: list[dict]) -> Tensor:
        logits = outputs["pred_logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # [B]
        true = torch.tensor(
            [len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device
        )
        return F.l1_loss(predicted, true)
