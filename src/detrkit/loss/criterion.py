"""The set prediction loss: classification of every query, box regression of matched ones."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from detrkit.loss.masks import mask_losses
from detrkit.loss.matcher import HungarianMatcher
from detrkit.models.config import DETRSegmentationConfig, ModelConfig
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.kinds import kind_of

SOFTMAX_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
FOCAL_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
# The class loss that trained each kind's way of scoring classes in the original code (a kind's
# ``classification``): cross-entropy over the softmax, focal loss on the per-class sigmoids.
CLASS_LOSSES = {"softmax": "softmax", "sigmoid": "focal"}


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

    - ``loss_ce``: classification of all queries. ``"softmax"`` (DETR): cross-entropy with unmatched
      queries labelled "no object", weighted by ``eos_coef`` to offset their majority.
      ``"focal"`` (Deformable DETR): sigmoid focal loss against one-hot targets, unmatched queries
      all-zero, normalised by the number of boxes;
    - ``loss_bbox`` / ``loss_giou``: L1 and 1 - GIoU of matched boxes, per target box;
    and, for logging only, ``class_error`` (% of matched queries misclassified) and
    ``cardinality_error`` (|predicted objects - true objects| per image).

    Auxiliary losses carry the decoder layer index as suffix (``loss_ce_0``); a two-stage model's
    encoder proposals are scored class-agnostically (``loss_ce_enc``). ``"loss"`` is the weighted
    total to back-propagate.

    In denoising training (``denoising`` given, the model's ``dn_outputs`` computed from it), each
    denoising query is also trained, at every layer, to give back the object it was noised from,
    with no matching: the same three losses, weighted as theirs and normalised by the number of
    denoising queries of objects, ``loss_ce_dn``, ``loss_bbox_dn``, ``loss_giou_dn`` (earlier
    layers: ``loss_ce_dn_0``...).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        eos_coef: float = 0.1,
        weight_dict: dict[str, float] | None = None,
        classification: str = "softmax",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if classification not in ("softmax", "focal"):
            raise ValueError(f"classification must be 'softmax' or 'focal', got {classification!r}")
        focal = classification == "focal"
        self.num_classes = num_classes
        self.classification = classification
        self.matcher = (
            matcher
            if matcher is not None
            else (
                HungarianMatcher(
                    cost_class=2.0, focal=True, focal_alpha=focal_alpha, focal_gamma=focal_gamma
                )
                if focal
                else HungarianMatcher()
            )
        )
        self.eos_coef = eos_coef
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        default_weights = FOCAL_WEIGHTS if focal else SOFTMAX_WEIGHTS
        self.weight_dict = dict(default_weights if weight_dict is None else weight_dict)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(
        self, outputs: dict, targets: list[dict], denoising: DenoisingQueries | None = None
    ) -> dict[str, Tensor]:
        self.check_labels(targets)
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        aux_outputs = outputs.get("aux_outputs", [])
        layers = [(outputs, targets, "")]
        layers += [(aux, targets, f"_{i}") for i, aux in enumerate(aux_outputs)]
        if "enc_outputs" in outputs:
            # Proposals are class-agnostic: every object is "class 0" for the encoder.
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            layers.append((outputs["enc_outputs"], agnostic, "_enc"))

        losses: dict[str, Tensor] = {}
        total = outputs["pred_logits"].new_zeros((), dtype=torch.float)
        for layer_outputs, layer_targets, suffix in layers:
            layer = self.layer_losses(layer_outputs, layer_targets, num_boxes)
            # Masks are predicted by the final layer only: other layers have no mask losses.
            total = total + sum(
                weight * layer[name] for name, weight in self.weight_dict.items() if name in layer
            )
            # Auxiliary layers report only their weighted losses; the logging metrics are final's.
            losses.update(
                {
                    name + suffix: value
                    for name, value in layer.items()
                    if not suffix or name in self.weight_dict
                }
            )
        if denoising is not None:
            dn_outputs = outputs["dn_outputs"]
            dn_layers = [(dn_outputs, "_dn")]
            dn_layers += [
                (aux, f"_dn_{i}") for i, aux in enumerate(dn_outputs.get("aux_outputs", []))
            ]
            for layer_outputs, suffix in dn_layers:
                layer = self.denoising_losses(layer_outputs, targets, denoising, num_boxes)
                total = total + sum(self.weight_dict[name] * value for name, value in layer.items())
                losses.update({name + suffix: value for name, value in layer.items()})
        with torch.no_grad():
            losses["cardinality_error"] = self.cardinality_error(outputs, targets)
        losses["loss"] = total
        return losses

    def denoising_losses(
        self, outputs: dict, targets: list[dict], denoising: DenoisingQueries, num_boxes: float
    ) -> dict[str, Tensor]:
        """One layer's losses of the denoising queries: each against the object it was noised
        from (classification of those queries only; padding queries are not trained)."""
        device = outputs["pred_logits"].device
        image = denoising.batch_index.to(device)
        query = denoising.query_index.to(device)
        # The objects of all images in one list: image b's object j is at start[b] + j.
        counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
        start = counts.cumsum(0) - counts
        flat = start[image] + denoising.target_index.to(device)
        labels = torch.cat([t["labels"] for t in targets]).to(device)[flat]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()[flat]
        # Each group holds every object once: num_boxes per group.
        num_targets = num_boxes * denoising.groups

        logits = outputs["pred_logits"][image, query].float()  # [T, C(+1)]
        if self.classification == "softmax":
            loss_ce = F.cross_entropy(logits, labels, reduction="sum") / num_targets
        else:
            onehot = F.one_hot(labels, self.num_classes).to(logits.dtype)
            focal = sigmoid_focal_loss(
                logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
            )
            loss_ce = focal.sum() / num_targets
        src_boxes = outputs["pred_boxes"][image, query].float()  # [T, 4]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_targets
        giou = torch.diag(
            generalized_box_iou(
                box_convert(src_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
            )
        )
        loss_giou = (1 - giou).sum() / num_targets
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def check_labels(self, targets: list[dict]) -> None:
        """Raises ValueError naming the first target whose labels fall outside 0..C-1: the
        softmax loss would take label C for "no object", and the focal loss would fail to index."""
        per_image = [target["labels"] for target in targets]

        def outside(labels: Tensor) -> bool:
            return bool(((labels < 0) | (labels >= self.num_classes)).any())

        # One check for the batch (on a GPU, one wait for it), then the culprit by name.
        if not per_image or not outside(torch.cat(per_image)):
            return
        for index, labels in enumerate(per_image):
            if outside(labels):
                raise ValueError(
                    f"targets[{index}]['labels'] must lie in 0..{self.num_classes - 1} "
                    f"(num_classes={self.num_classes}), got {labels.tolist()}"
                )

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        """The losses of one layer's predictions (matching included)."""
        indices = self.matcher(outputs, targets)
        device = outputs["pred_logits"].device
        batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
        pred_idx = torch.cat([pred for pred, _ in indices])
        batch_idx, pred_idx = batch_idx.to(device), pred_idx.to(device)

        logits = outputs["pred_logits"].float()  # [B, Q, C(+1)]
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]).to(
            device
        )
        # Every query has a target class; unmatched ones get num_classes ("no object").
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )
        target_classes[batch_idx, pred_idx] = matched_labels
        if self.classification == "softmax":
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        else:
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            focal = sigmoid_focal_loss(
                logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
            )  # [B, Q, C]
            # Summed over queries and classes, per target box (the original writes this as
            # mean over queries, times the number of queries).
            loss_ce = focal.sum() / num_boxes

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
                predicted = logits[batch_idx, pred_idx].argmax(-1)
                class_error = 100 - (predicted == matched_labels).float().mean() * 100
            else:
                class_error = logits.new_zeros(())
        losses = {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "class_error": class_error,
        }
        if "pred_masks" in outputs:  # the panoptic models' final layer
            for index, target in enumerate(targets):
                if "masks" not in target:
                    raise ValueError(
                        f"targets[{index}] has no 'masks': a model with a mask head is trained "
                        "on every object's mask ([n, H, W], as its boxes)"
                    )
            losses.update(mask_losses(outputs["pred_masks"], targets, indices, num_boxes))
        return losses

    def cardinality_error(self, outputs: dict, targets: list[dict]) -> Tensor:
        """|number of predicted objects - number of targets|, averaged over images."""
        logits = outputs["pred_logits"]
        if self.classification == "softmax":
            is_object = logits.argmax(-1) != logits.shape[-1] - 1
        else:
            is_object = logits.sigmoid().max(-1).values > 0.5
        true = torch.tensor(
            [len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device
        )
        return F.l1_loss(is_object.sum(1).float(), true)


def build_criterion(config: ModelConfig) -> SetCriterion:
    """The loss a model config's detector was trained with in the original code."""
    loss = CLASS_LOSSES[kind_of(config).classification]
    if isinstance(config, DETRSegmentationConfig):
        # The panoptic models add the mask losses, each weighted 1 as in the original.
        weights = {**SOFTMAX_WEIGHTS, "loss_mask": 1.0, "loss_dice": 1.0}
        return SetCriterion(config.num_classes, weight_dict=weights, classification=loss)
    return SetCriterion(config.num_classes, classification=loss)
