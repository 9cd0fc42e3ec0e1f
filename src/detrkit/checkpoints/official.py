"""Checkpoints as the DETR authors publish them: a torch pickle holding ``"model"`` (a state dict
with the official parameter names, which are detrkit's own) and usually ``"args"`` (an
``argparse.Namespace``), ``"optimizer"``, ``"lr_scheduler"`` and ``"epoch"``; or a bare state dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrkit.checkpoints.errors import CheckpointError
from detrkit.models.config import (
    DeformableDETRConfig,
    DETRConfig,
    DETRSegmentationConfig,
    ModelConfig,
)

# The only globals an official checkpoint's pickle may name besides torch's tensor machinery.
SAFE_GLOBALS = [argparse.Namespace]
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


# Suffixes of the files detrkit's exports write: models to run, not checkpoints to load.
EXPORT_SUFFIXES = (".onnx", ".pt2")


def _reason(error: Exception) -> str:
    """``: `` and the line of torch's unpickling message that says what is wrong with the file;
    empty when that line is no words (a bare opcode or byte value means nothing to a reader)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines[1:] if not line.startswith(("Check the doc", "Please file"))]
    line = (useful or lines or [repr(error)])[-1].removeprefix("WeightsUnpickler error:").strip()
    return f": {line}" if sum(c.isalpha() for c in line) >= 3 else ""


def read_torch_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: no pickled code can run, only data is rebuilt."""
    if path.suffix.lower() in EXPORT_SUFFIXES:
        raise CheckpointError(
            path,
            "an exported model, not a checkpoint: run it with detrkit.deploy.ExportedModel",
        )
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
            path, f"not a readable PyTorch checkpoint (corrupt?){_reason(error)}"
        ) from None
    except Exception as error:  # arbitrary bytes can make the unpickler fail in any way
        raise CheckpointError(
            path, f"not a readable PyTorch checkpoint (truncated or corrupt?){_reason(error)}"
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


def layer_count(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def resnet_depth(state_dict: dict[str, Tensor]) -> str:
    """Which ResNet the backbone's weights are: bottleneck blocks (a conv3) make a ResNet-50 or
    -101, basic blocks a ResNet-18 or -34; the number of blocks in layer3 tells them apart."""
    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state_dict
    blocks = layer_count(state_dict, "backbone.0.body.layer3.")
    if bottleneck:
        return "resnet101" if blocks > 6 else "resnet50"
    return "resnet34" if blocks > 2 else "resnet18"


def _common_fields(state_dict: dict[str, Tensor], args: dict[str, Any]) -> dict[str, Any]:
    """The fields every detector reads the same way off its weights and training arguments."""
    return {
        "backbone": resnet_depth(state_dict),
        "dilation": bool(args.get("dilation", False)),
        "position_embedding": "learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        "nheads": int(args.get("nheads") or 8),
        "enc_layers": layer_count(state_dict, "transformer.encoder.layers."),
        "dec_layers": layer_count(state_dict, "transformer.decoder.layers."),
        "dim_feedforward": state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        "dropout": float(args.get("dropout", 0.1)),
        "aux_loss": bool(args.get("aux_loss", True)),
    }


def infer_detr_config(
    path: Path, state_dict: dict[str, Tensor], args: dict[str, Any]
) -> DETRConfig:
    """Reads a DETR variant off its weights; what weights cannot tell (heads, dilation, dropout)
    comes from the training arguments when present, else the original defaults."""
    _require(path, state_dict, "query_embed.weight", "class_embed.weight", model="DETR")
    num_queries, hidden_dim = state_dict["query_embed.weight"].shape
    return DETRConfig(
        **_common_fields(state_dict, args),
        hidden_dim=hidden_dim,
        pre_norm="transformer.encoder.norm.weight" in state_dict,
        num_queries=num_queries,
        num_classes=state_dict["class_embed.weight"].shape[0] - 1,
    )


def infer_detr_segmentation_config(
    path: Path, state_dict: dict[str, Tensor], args: dict[str, Any]
) -> DETRSegmentationConfig:
    """A panoptic DETR: its detector's config, read off the weights under ``detr.``."""
    detector = {k[len("detr.") :]: v for k, v in state_dict.items() if k.startswith("detr.")}
    config = infer_detr_config(path, detector, args)
    return DETRSegmentationConfig(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    )


def infer_deformable_detr_config(
    path: Path, state_dict: dict[str, Tensor], args: dict[str, Any]
) -> DeformableDETRConfig:
    """Reads a Deformable DETR variant (single- or multi-scale, box refinement, two-stage) off its
    weights; heads, points per level and dilation come from the training arguments or defaults."""
    _require(
        path, state_dict, "transformer.level_embed", "class_embed.0.weight", model="Deformable DETR"
    )
    num_feature_levels, hidden_dim = state_dict["transformer.level_embed"].shape
    two_stage = "transformer.enc_output.weight" in state_dict
    if two_stage:
        num_queries = int(args.get("num_queries") or 300)
    else:
        _require(path, state_dict, "query_embed.weight", model="Deformable DETR")
        num_queries = state_dict["query_embed.weight"].shape[0]
    fields = _common_fields(state_dict, args)
    nheads = fields["nheads"]
    points = {}
    for name, module in (
        ("enc_n_points", "encoder.layers.0.self_attn"),
        ("dec_n_points", "decoder.layers.0.cross_attn"),
    ):
        points[name] = int(args.get(name) or 4)
        outputs = state_dict[f"transformer.{module}.attention_weights.weight"].shape[0]
        if outputs != nheads * num_feature_levels * points[name]:
            raise CheckpointError(
                path,
                f"transformer.{module}.attention_weights has {outputs} outputs, not nheads x levels "
                f"x points = {nheads} x {num_feature_levels} x {points[name]}; pass the right "
                f"nheads and {name} to detrkit.load",
            )
    return DeformableDETRConfig(
        **fields,
        hidden_dim=hidden_dim,
        num_queries=num_queries,
        num_classes=state_dict["class_embed.0.weight"].shape[0],
        num_feature_levels=num_feature_levels,
        with_box_refine="transformer.decoder.bbox_embed.0.layers.0.weight" in state_dict,
        two_stage=two_stage,
        **points,
    )


# How the config of each model kind is read off official weights, by kind name.
CONFIG_READERS = {
    "detr": infer_detr_config,
    "deformable_detr": infer_deformable_detr_config,
    "detr_segmentation": infer_detr_segmentation_config,
}


def _require(path: Path, state_dict: dict[str, Tensor], *keys: str, model: str) -> None:
    for key in keys:
        if key not in state_dict:
            raise CheckpointError(
                path, f"unknown format: no '{key}', so this is not a {model} detection model"
            )


def detect_model_type(path: Path, state_dict: dict[str, Tensor]) -> str:
    """'detr', 'deformable_detr' or 'detr_segmentation' (the panoptic models: the detector under
    ``detr.`` and a mask head) by the weights."""
    if "mask_head.lay1.weight" in state_dict:
        return "detr_segmentation"
    if any(k.startswith("detr.") for k in state_dict):
        raise CheckpointError(
            path, "a DETR under 'detr.' without a mask head ('mask_head.lay1.weight')"
        )
    return "deformable_detr" if "transformer.level_embed" in state_dict else "detr"


def infer_config(path: Path, state_dict: dict[str, Tensor], args: dict[str, Any]) -> ModelConfig:
    """The config of the model that ``state_dict`` (official names) belongs to."""
    return CONFIG_READERS[detect_model_type(path, state_dict)](path, state_dict, args)
