"""Checkpoints as the DETR authors publish them: a torch pickle holding ``"model"`` (a state dict
with the official parameter names, which are detrkit's own) and usually ``"args"`` (an
``argparse.Namespace``), ``"optimizer"``, ``"lr_scheduler"`` and ``"epoch"``; or a bare state dict.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrkit.checkpoints.errors import CheckpointError
from detrkit.models.config import DETRConfig

# The only globals an official checkpoint's pickle may name besides torch's tensor machinery.
SAFE_GLOBALS = [argparse.Namespace]
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _reason(error: Exception) -> str:
    """The line of torch's unpickling message that says what is wrong with the file."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines[1:] if not line.startswith(("Check the doc", "Please file"))]
    return (useful or lines or [repr(error)])[-1].removeprefix("WeightsUnpickler error:").strip()


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: no pickled code can run, only data is rebuilt."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps the reason in advice to retry with weights_only=False; never do that.
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            raise CheckpointError(
                path,
                f"refused to unpickle: the file asks for the global {refused.group(1)}, which a "
                "checkpoint does not need; nothing in it was run",
            ) from None
        raise CheckpointError(
            path, f"not a readable PyTorch checkpoint (corrupt?): {_reason(error)}"
        ) from None
    except Exception as error:  # arbitrary bytes can make the unpickler fail in any way
        raise CheckpointError(
            path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {_reason(error)}"
        ) from None


def split_official(path: Path, obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Returns the state dict and the training arguments (empty when absent) of a loaded file."""
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"unknown format: expected a dict, found {type(obj).__name__}")
    args: dict[str, Any] = {}
    if "model" in obj and isinstance(obj["model"], dict):
        state_dict = obj["model"]
        if isinstance(obj.get("args"), argparse.Namespace):
            args = vars(obj["args"])
        elif isinstance(obj.get("args"), dict):
            args = obj["args"]
    else:
        state_dict = obj
    if not state_dict or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(
            path,
            "unknown format: no state dict of named tensors (expected a 'model' entry "
            "or a bare state dict)",
        )
    return state_dict, args


def _layer_count(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_detr_config(
    path: Path, state_dict: dict[str, Tensor], args: dict[str, Any]
) -> DETRConfig:
    """Reads a DETR variant off its weights; what weights cannot tell (heads, dilation, dropout)
    comes from the training arguments when present, else the original defaults."""
    for key in ("query_embed.weight", "class_embed.weight"):
        if key not in state_dict:
            raise CheckpointError(
                path, f"unknown format: no '{key}', so this is not a DETR detection model"
            )
    num_queries, hidden_dim = state_dict["query_embed.weight"].shape
    layer3_blocks = _layer_count(state_dict, "backbone.0.body.layer3.")
    return DETRConfig(
        backbone="resnet101" if layer3_blocks > 6 else "resnet50",
        dilation=bool(args.get("dilation", False)),
        position_embedding="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        hidden_dim=hidden_dim,
        nheads=int(args.get("nheads", 8)),
        enc_layers=_layer_count(state_dict, "transformer.encoder.layers."),
        dec_layers=_layer_count(state_dict, "transformer.decoder.layers."),
        dim_feedforward=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        dropout=float(args.get("dropout", 0.1)),
        pre_norm="transformer.encoder.norm.weight" in state_dict,
        num_queries=num_queries,
        num_classes=state_dict["class_embed.weight"].shape[0] - 1,
        aux_loss=bool(args.get("aux_loss", True)),
    )


def detect_model_type(path: Path, state_dict: dict[str, Tensor]) -> str:
    """'detr' for DETR detection weights; refuses what detrkit cannot build, naming it."""
    if any(k.startswith("detr.") for k in state_dict) or "bbox_attention.q_linear.weight" in (
        state_dict
    ):
        raise CheckpointError(
            path,
            "this is a DETR panoptic segmentation checkpoint; detrkit builds detection models only",
        )
    if "transformer.level_embed" in state_dict:
        raise CheckpointError(path, "Deformable DETR checkpoints are not supported yet")
    return "detr"
