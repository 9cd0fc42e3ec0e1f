"""Non-finite weights: a model whose parameters hold NaN or infinity computes nothing meaningful,
yet evaluates and predicts without complaint (pycocotools even counts a NaN box as a match). Every
place that evaluates, predicts, exports or keeps a checkpoint as good asks this module first."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from detrkit.checkpoints.errors import format_names


class NonFiniteError(ValueError):
    """Weights or outputs hold NaN or infinity; the message names what and where."""


def non_finite_names(tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or infinity."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [
        name
        for name, tensor in items
        if isinstance(tensor, Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]


def require_finite_weights(model: nn.Module | Mapping[str, Tensor], source: str) -> None:
    """Raises :class:`NonFiniteError` naming ``source`` (a file, or what the model is for) and the
    parameters or buffers of ``model`` (a module or a state dict) that are not finite."""
    tensors = model.state_dict() if isinstance(model, nn.Module) else model
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteError(
            f"{source}: the model's weights hold NaN or infinity ({len(bad)} tensors: "
            f"{format_names(bad, limit=4)}); it cannot give meaningful results (a training run "
            "that diverged? use an earlier checkpoint or a lower learning rate)"
        )


def require_finite_outputs(outputs: Mapping[str, Tensor], source: str) -> None:
    """Raises :class:`NonFiniteError` when a model's class or box outputs hold NaN or infinity
    (``source``: what was being run, e.g. the image or the checkpoint)."""
    bad = non_finite_names((k, v) for k, v in outputs.items() if k.startswith("pred_"))
    if bad:
        raise NonFiniteError(
            f"{source}: the model's outputs hold NaN or infinity ({', '.join(bad)}); its "
            "detections would be meaningless"
        )
