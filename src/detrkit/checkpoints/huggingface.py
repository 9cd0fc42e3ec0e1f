"""Hugging Face ``DetrForObjectDetection`` directories (``save_pretrained`` and the Hub layout):
``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, converted to the official
parameter names.

Both of transformers' backbone layouts are understood: the timm ResNet of the Hub checkpoints
(``facebook/detr-resnet-50``), whose names equal torchvision's, and transformers' own ResNet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrkit.checkpoints.errors import CheckpointError, format_names
from detrkit.checkpoints.native import read_safetensors
from detrkit.checkpoints.official import infer_detr_config, read_torch_file
from detrkit.models.config import DETRConfig

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_BACKBONE = r"(?:model\.)?backbone\.(?:conv_encoder\.)?model\."
_LAYER = r"(?:model\.)?(encoder|decoder)\.layers\.(\d+)\."

# (pattern, replacement) applied in order; the first that matches renames the key.
_RENAMES: list[tuple[str, str]] = [
    # transformers' own ResNet
    (_BACKBONE + r"embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
    (_BACKBONE + r"embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
        r"backbone.0.body.layer<\1+1>.\2.downsample.0.",
    ),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
        r"backbone.0.body.layer<\1+1>.\2.downsample.1.",
    ),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
        r"backbone.0.body.layer<\1+1>.\2.conv<\3+1>.",
    ),
    (
        _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
        r"backbone.0.body.layer<\1+1>.\2.bn<\3+1>.",
    ),
    # timm's ResNet already uses torchvision's names
    (_BACKBONE, "backbone.0.body."),
    (
        r"(?:model\.)?(?:backbone\.)?position_embedding(?:s)?\.row_embeddings\.",
        "backbone.1.row_embed.",
    ),
    (
        r"(?:model\.)?(?:backbone\.)?position_embedding(?:s)?\.column_embeddings\.",
        "backbone.1.col_embed.",
    ),
    (r"(?:model\.)?input_projection\.", "input_proj."),
    (r"(?:model\.)?query_position_embeddings\.", "query_embed."),
    (_LAYER + r"self_attn\.(q|k|v)_proj\.", r"transformer.\1.layers.\2.self_attn.<\3>."),
    (_LAYER + r"encoder_attn\.(q|k|v)_proj\.", r"transformer.\1.layers.\2.multihead_attn.<\3>."),
    (_LAYER + r"self_attn\.(?:out|o)_proj\.", r"transformer.\1.layers.\2.self_attn.out_proj."),
    (
        _LAYER + r"encoder_attn\.(?:out|o)_proj\.",
        r"transformer.\1.layers.\2.multihead_attn.out_proj.",
    ),
    (_LAYER + r"self_attn_layer_norm\.", r"transformer.\1.layers.\2.norm1."),
    (_LAYER + r"encoder_attn_layer_norm\.", r"transformer.\1.layers.\2.norm2."),
    (_LAYER + r"(?:mlp\.)?fc1\.", r"transformer.\1.layers.\2.linear1."),
    (_LAYER + r"(?:mlp\.)?fc2\.", r"transformer.\1.layers.\2.linear2."),
    (
        r"(?:model\.)?encoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.encoder.layers.\1.norm2.",
    ),
    (
        r"(?:model\.)?decoder\.layers\.(\d+)\.final_layer_norm\.",
        r"transformer.decoder.layers.\1.norm3.",
    ),
    (r"(?:model\.)?decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"class_labels_classifier\.", "class_embed."),
    (r"bbox_predictor\.", "bbox_embed."),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _RENAMES]
_PLUS_ONE = re.compile(r"<(\d+)\+1>")
_QKV = re.compile(r"^(.*)\.<(q|k|v)>\.(weight|bias)$")


def _rename(key: str) -> str | None:
    for pattern, replacement in _COMPILED:
        match = pattern.match(key)
        if match:
            renamed = match.expand(replacement) + key[match.end() :]
            # Stages and convs count from 0 in transformers' ResNet, from 1 in torchvision's.
            return _PLUS_ONE.sub(lambda m: str(int(m.group(1)) + 1), renamed)
    return None


def convert_hf_state_dict(path: Path, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Renames a transformers DETR state dict to the official names; separate q/k/v projections
    are stacked into ``in_proj_weight``/``in_proj_bias`` as ``nn.MultiheadAttention`` keeps them."""
    state_dict: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in hf_state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        renamed = _rename(key)
        if renamed is None:
            unknown.append(key)
            continue
        match = _QKV.match(renamed)
        if match:
            module, part, kind = match.groups()
            qkv.setdefault((module, kind), {})[part] = tensor
        else:
            state_dict[renamed] = tensor
    if unknown:
        raise CheckpointError(
            path, f"unexpected keys for a DETR detection model: {format_names(unknown)}"
        )
    for (module, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                path, f"{module}: attention has only the {sorted(parts)} projections of q, k, v"
            )
        state_dict[f"{module}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state_dict


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_directory(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], DETRConfig]:
    """Reads a transformers DETR directory into official-named weights and a detrkit config."""
    config_file = path / "config.json"
    try:
        hf_config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(config_file, f"not a readable JSON config: {error}") from None
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type != "detr":
        raise CheckpointError(
            config_file, f"model_type is {model_type!r}; detrkit reads 'detr' directories"
        )
    if any("Segmentation" in a for a in architectures):
        raise CheckpointError(
            config_file,
            f"{architectures[0]} is a segmentation model; detrkit builds detection models only",
        )
    hf_state_dict = _read_hf_weights(path, map_location)
    state_dict = convert_hf_state_dict(path, hf_state_dict)

    backbone_config = hf_config.get("backbone_config") or {}
    args = {
        "nheads": hf_config.get("encoder_attention_heads", 8),
        "dropout": hf_config.get("dropout", 0.1),
        "dilation": hf_config.get("dilation", False) or backbone_config.get("output_stride") == 16,
    }
    config = infer_detr_config(path, state_dict, args)
    id2label = hf_config.get("id2label") or {}
    names = [id2label.get(str(i)) for i in range(config.num_classes)]
    if all(isinstance(name, str) for name in names):
        config.class_names = names
    return state_dict, config


def _read_hf_weights(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    safetensors_file = path / HF_WEIGHT_FILES[0]
    if safetensors_file.is_file():
        return read_safetensors(safetensors_file, map_location)
    bin_file = path / HF_WEIGHT_FILES[1]
    if bin_file.is_file():
        return read_torch_file(bin_file, map_location)
    raise CheckpointError(
        path, f"no weights: expected {' or '.join(HF_WEIGHT_FILES)} next to config.json"
    )
