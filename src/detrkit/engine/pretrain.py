"""Backbone pre-training by classifying digit crops: the CPU stand-in for ImageNet pre-training.

DETR and Deformable DETR start from an ImageNet-trained ResNet; trained from scratch, their
backbone learns what the digits look like only through the slow, noisy signal of set matching.
A few hundred steps of plain classification on crops of the training split's digits give the
backbone that knowledge first, for a small part of the training budget. Nothing from the
validation split is used (its scenes draw from other digits). ``detrkit train`` then treats the
backbone as the original treats ImageNet weights (:meth:`ResNetBackbone.freeze_as_pretrained`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.engine.optim import build_adamw
from detrkit.models.backbone import ResNetBackbone

_MIN_ONE_CYCLE_STEPS = 20


def pretrain_backbone(
    backbone: ResNetBackbone,
    crops: Tensor,
    labels: Tensor,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    sizes: Sequence[int] = (24, 32, 48, 64),
    seed: int = 0,
    log: Callable[[dict[str, float]], None] | None = None,
    log_every: int = 50,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Trains ``backbone`` in place to classify ``crops`` ``[N, 3, S, S]`` uint8 into ``labels``
    ``[N]`` through a linear layer on its last feature map (average-pooled), which is discarded
    afterwards. Each batch is resized to one of ``sizes`` so that the features serve objects of
    several scales. AdamW with a one-cycle schedule (a constant rate below 20 steps).

    Returns the accuracy over the last ``log_every`` batches (training batches: a progress figure,
    not a validation result). ``log`` receives ``{"step", "loss", "accuracy"}`` records.
    ``autocast_dtype``: the forward runs under ``torch.autocast`` in it (None: full precision).
    """
    if len(crops) == 0:
        raise ValueError("backbone pre-training needs at least one crop")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = next(backbone.parameters()).device
    num_classes = int(labels.max()) + 1
    head = nn.Linear(backbone.num_channels[-1], num_classes).to(device)
    parameters = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = build_adamw(parameters, lr=lr, weight_decay=1e-4)
    # fp16 gradients of a small loss underflow without scaling; bf16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    if steps >= _MIN_ONE_CYCLE_STEPS:
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, lr, total_steps=steps, pct_start=0.1
        )
    else:  # one-cycle's warm-up would be under 2 steps, which it cannot schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    generator = torch.Generator().manual_seed(seed)
    backbone.train()
    correct, seen = 0, 0
    for step in range(1, steps + 1):
        index = torch.randint(len(crops), (batch_size,), generator=generator)
        size = sizes[int(torch.randint(len(sizes), (), generator=generator))]
        batch = crops[index].to(device).float()
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
        images = (batch - mean) / std  # [B, 3, size, size]
        no_padding = torch.zeros(batch_size, size, size, dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            features, _ = backbone(images, no_padding)
            logits = head(features[-1].mean((2, 3)))  # [B, classes]
        target = labels[index].to(device)
        loss = F.cross_entropy(logits.float(), target)  # in float32, as the detector's loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        if (step - 1) % log_every == 0:
            correct, seen = 0, 0
        correct += int((logits.argmax(1) == target).sum())
        seen += batch_size
        if log is not None and (step % log_every == 0 or step == steps):
            log({"step": step, "loss": round(loss.item(), 5), "accuracy": correct / seen})
    return correct / seen
