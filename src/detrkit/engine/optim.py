"""Optimiser and learning-rate schedule of the original training recipes."""

from __future__ import annotations

import torch
from torch import nn

# Deformable DETR trains these projections at a fraction of the base learning rate: they turn
# queries into sampling positions, and large steps scatter the sampling points.
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def param_groups(
    model: nn.Module,
    lr: float,
    lr_backbone: float,
    lr_linear_proj_mult: float = 1.0,
) -> list[dict]:
    """Trainable parameters split into the transformer/heads (``lr``), the backbone
    (``lr_backbone``) and the sampling projections (``lr * lr_linear_proj_mult``). Empty groups
    are dropped."""
    groups: dict[str, list[nn.Parameter]] = {"main": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # "backbone.0." or, under a panoptic model's detector, "detr.backbone.0."
        if ".backbone.0." in f".{name}":
            groups["backbone"].append(param)
        elif lr_linear_proj_mult != 1.0 and any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"].append(param)
        else:
            groups["main"].append(param)
    rates = {"main": lr, "backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult}
    return [
        {"params": params, "lr": rates[name], "name": name}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    lr_backbone: float,
    weight_decay: float,
    lr_linear_proj_mult: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (see :func:`build_adamw`)."""
    groups = param_groups(model, lr, lr_backbone, lr_linear_proj_mult)
    return build_adamw(groups, lr=lr, weight_decay=weight_decay)


def build_adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW fused into one kernel where torch supports it: on the CPU the unfused step of a
    ResNet-18's parameters costs about as much as a small batch's forward pass."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        # Some dtype/device combinations have no fused implementation.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
