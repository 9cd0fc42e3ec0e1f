"""Hungarian matching of predictions to ground-truth objects (one prediction per object)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Finds, per image, the assignment of predictions to targets with the lowest total cost

    ``cost_class * class cost + cost_bbox * L1(boxes) + cost_giou * -GIoU(boxes)``.

    The class cost is -p(target class) under a softmax (DETR), or with ``focal=True`` the focal
    loss of predicting the target class minus that of not predicting it, under sigmoids
    (Deformable DETR). Targets are dicts with ``"labels"`` ``[N]`` and ``"boxes"`` ``[N, 4]``
    (normalised cx, cy, w, h); images without objects are allowed.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Returns per image ``(prediction_indices, target_indices)``, both int64 of equal length."""
        batch, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch)]

        logits = outputs["pred_logits"].flatten(0, 1).float()  # [B*Q, C(+1)]
        out_bbox = outputs["pred_boxes"].flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])  # [T]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).float()  # [T, 4]

        cost_class = self.class_cost(logits)[:, tgt_ids]  # [B*Q, T]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy")
        )
        cost = (
            self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        )
        cost = cost.view(batch, num_queries, -1).cpu()  # [B, Q, T]
        # scipy refuses non-finite costs, which a diverging run's predictions give: matched
        # anyway, they make the loss non-finite, which the training loop reports with its step.
        cost = cost.nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8)

        indices = []
        for i, image_cost in enumerate(cost.split(sizes, -1)):
            pred_idx, tgt_idx = linear_sum_assignment(image_cost[i])
            indices.append(
                (
                    torch.as_tensor(pred_idx, dtype=torch.int64),
                    torch.as_tensor(tgt_idx, dtype=torch.int64),
                )
            )
        return indices

    def class_cost(self, logits: Tensor) -> Tensor:
        """``[B*Q, C]`` cost of assigning each prediction to each class."""
        if not self.focal:
            # -p approximates -log p: a monotone change that rarely changes the matching.
            return -logits.softmax(-1)
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return pos_cost - neg_cost
