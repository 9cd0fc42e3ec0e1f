"""Hugging Face ``DetrForObjectDetection`` directories (``save_pretrained`` and the Hub layout):
``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``, converted to the official
parameter names.

Both of transformers' backbone layouts are understood: the timm ResNet of the Hub checkpoints
(``facebook/detr-resnet-50``), whose names equal torchvision's, and transformers' own ResNet.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detrkit.checkpoints.errors import CheckpointError, format_names
from detrkit.checkpoints.native import read_safetensors, shared_names
from detrkit.checkpoints.official import infer_config, layer_count, read_torch_file
from detrkit.files import existing_results, write_atomically, write_text
from detrkit.models.config import ModelConfig

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_BACKBONE = r"(?:model\.)?backbone\.(?:conv_encoder\.)?model\."
_ENC = r"(?:model\.)?encoder\.layers\.(\d+)\."
_DEC = r"(?:model\.)?decoder\.layers\.(\d+)\."
_STAGE = _BACKBONE + r"encoder\.stages\.(\d+)\.layers\.(\d+)\."

# (pattern, replacement) applied in order; the first that matches renames the key. ``<i+1>``
# increments an index: stages and convs count from 0 in transformers' ResNet, from 1 in torchvision.
_BACKBONE_RENAMES: list[tuple[str, str]] = [
    # transformers' own ResNet
    (_BACKBONE + r"embedder\.embedder\.convolution\.", "backbone.0.body.conv1."),
    (_BACKBONE + r"embedder\.embedder\.normalization\.", "backbone.0.body.bn1."),
    (_STAGE + r"shortcut\.convolution\.", r"backbone.0.body.layer<\1+1>.\2.downsample.0."),
    (_STAGE + r"shortcut\.normalization\.", r"backbone.0.body.layer<\1+1>.\2.downsample.1."),
    (_STAGE + r"layer\.(\d+)\.convolution\.", r"backbone.0.body.layer<\1+1>.\2.conv<\3+1>."),
    (_STAGE + r"layer\.(\d+)\.normalization\.", r"backbone.0.body.layer<\1+1>.\2.bn<\3+1>."),
    # timm's ResNet already uses torchvision's names
    (_BACKBONE, "backbone.0.body."),
    (r"(?:model\.)?(?:backbone\.)?position_embeddings?\.row_embeddings\.", "backbone.1.row_embed."),
    (
        r"(?:model\.)?(?:backbone\.)?position_embeddings?\.column_embeddings\.",
        "backbone.1.col_embed.",
    ),
    (r"(?:model\.)?query_position_embeddings\.", "query_embed."),
    # the feed-forward blocks of both models
    (_ENC + r"(?:mlp\.)?fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (_ENC + r"(?:mlp\.)?fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (_ENC + r"self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (_ENC + r"final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (_DEC + r"(?:mlp\.)?fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (_DEC + r"(?:mlp\.)?fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (_DEC + r"final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    # decoder self-attention: nn.MultiheadAttention in both models (q/k/v stacked later)
    (_DEC + r"self_attn\.(q|k|v)_proj\.", r"transformer.decoder.layers.\1.self_attn.<\2>."),
    (_DEC + r"self_attn\.(?:out|o)_proj\.", r"transformer.decoder.layers.\1.self_attn.out_proj."),
]

_DETR_RENAMES: list[tuple[str, str]] = [
    (r"(?:model\.)?input_projection\.", "input_proj."),
    (_ENC + r"self_attn\.(q|k|v)_proj\.", r"transformer.encoder.layers.\1.self_attn.<\2>."),
    (_ENC + r"self_attn\.(?:out|o)_proj\.", r"transformer.encoder.layers.\1.self_attn.out_proj."),
    (_DEC + r"encoder_attn\.(q|k|v)_proj\.", r"transformer.decoder.layers.\1.multihead_attn.<\2>."),
    (
        _DEC + r"encoder_attn\.(?:out|o)_proj\.",
        r"transformer.decoder.layers.\1.multihead_attn.out_proj.",
    ),
    (_DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (_DEC + r"encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"(?:model\.)?decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"class_labels_classifier\.", "class_embed."),
    (r"bbox_predictor\.", "bbox_embed."),
]

_DEFORMABLE_RENAMES: list[tuple[str, str]] = [
    (r"(?:model\.)?input_proj\.", "input_proj."),
    (_ENC + r"self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (_DEC + r"encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    # the original's decoder layer: norm1 after cross-attention, norm2 after self-attention
    (_DEC + r"encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (_DEC + r"self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"(?:model\.)?decoder\.(bbox_embed|class_embed)\.", r"transformer.decoder.\1."),
    (
        r"model\.(level_embed|reference_points|enc_output_norm|enc_output|pos_trans_norm|pos_trans)",
        r"transformer.\1",
    ),
    (r"(class_embed|bbox_embed)\.", r"\1."),
]

# transformers' DetrForSegmentation: the detector under "detr.", and the mask head and attention
# map. save_pretrained writes the original names (kept as they are); transformers 5's module
# names are renamed.
_SEGMENTATION_RENAMES: list[tuple[str, str]] = [
    (r"detr\." + pattern, "detr." + replacement)
    for pattern, replacement in _BACKBONE_RENAMES + _DETR_RENAMES
] + [
    (r"(?:mask_head\.(?:lay\d|gn\d|adapter\d|out_lay)|bbox_attention\.[qk]_linear)\.", r"\g<0>"),
    (r"mask_head\.conv([12])\.conv\.", r"mask_head.lay\1."),
    (r"mask_head\.conv([12])\.norm\.", r"mask_head.gn\1."),
    (r"mask_head\.fpn_stages\.(\d)\.fpn_adapter\.", r"mask_head.adapter<\1+1>."),
    (r"mask_head\.fpn_stages\.(\d)\.refine\.conv\.", r"mask_head.lay<\1+3>."),
    (r"mask_head\.fpn_stages\.(\d)\.refine\.norm\.", r"mask_head.gn<\1+3>."),
    (r"mask_head\.output_conv\.", "mask_head.out_lay."),
    (r"bbox_attention\.(q|k)_proj\.", r"bbox_attention.\1_linear."),
]

RENAMES = {
    "detr": _BACKBONE_RENAMES + _DETR_RENAMES,
    "deformable_detr": _BACKBONE_RENAMES + _DEFORMABLE_RENAMES,
    "detr_segmentation": _SEGMENTATION_RENAMES,
}
_COMPILED = {
    model_type: [(re.compile(pattern), replacement) for pattern, replacement in renames]
    for model_type, renames in RENAMES.items()
}
# "<i+n>" in a renamed key: the index i plus n (transformers counts stages, convs and mask-head
# stages from 0 where the original counts from 1 or continues a numbering).
_PLUS = re.compile(r"<(\d+)\+(\d+)>")


def _add_indices(key: str) -> str:
    return _PLUS.sub(lambda m: str(int(m.group(1)) + int(m.group(2))), key)


_QKV = re.compile(r"^(.*)\.<(q|k|v)>\.(weight|bias)$")


def _rename(key: str, model_type: str) -> str | None:
    for pattern, replacement in _COMPILED[model_type]:
        match = pattern.match(key)
        if match:
            renamed = match.expand(replacement) + key[match.end() :]
            return _add_indices(renamed)
    return None


def convert_hf_state_dict(
    path: Path, hf_state_dict: dict[str, Tensor], model_type: str = "detr"
) -> dict[str, Tensor]:
    """Renames a transformers state dict (``model_type`` a kind's name) to the official names;
    separate q/k/v projections are stacked into ``in_proj_weight``/``in_proj_bias``
    as ``nn.MultiheadAttention`` keeps them."""
    state_dict: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in hf_state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        renamed = _rename(key, model_type)
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
            path, f"unexpected keys for a {model_type} model: {format_names(unknown)}"
        )
    for (module, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                path, f"{module}: attention has only the {sorted(parts)} projections of q, k, v"
            )
        state_dict[f"{module}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state_dict


# The config.json fields detrkit reads, by kind: a string "8" or "yes" is refused, not converted.
_FIELD_KINDS = {
    "encoder_attention_heads": (int, lambda v: isinstance(v, int)),
    "num_queries": (int, lambda v: isinstance(v, int)),
    "encoder_n_points": (int, lambda v: isinstance(v, int)),
    "decoder_n_points": (int, lambda v: isinstance(v, int)),
    "dropout": (float, lambda v: isinstance(v, (int, float))),
    "dilation": (bool, lambda v: isinstance(v, bool)),
}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def is_hf_directory(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_directory(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Reads a transformers DETR or Deformable DETR directory into official-named weights and a
    detrkit config."""
    config_file = path / "config.json"
    try:
        hf_config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(config_file, f"not a readable JSON config: {error}") from None
    if not isinstance(hf_config, dict):
        raise CheckpointError(config_file, "not a transformers config (expected a JSON object)")
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type not in ("detr", "deformable_detr"):
        raise CheckpointError(
            config_file,
            f"model_type is {model_type!r}; detrkit reads 'detr' and 'deformable_detr' directories",
        )
    if "DetrForSegmentation" in architectures:
        model_type = "detr_segmentation"
    elif any("Segmentation" in a for a in architectures):
        raise CheckpointError(
            config_file, f"{architectures[0]}: detrkit reads DETR's segmentation models only"
        )
    state_dict = convert_hf_state_dict(path, _read_hf_weights(path, map_location), model_type)

    for name, (kind, accepts) in _FIELD_KINDS.items():
        value = hf_config.get(name)
        if value is not None and (isinstance(value, bool) != (kind is bool) or not accepts(value)):
            raise CheckpointError(config_file, f"{name} must be {_KIND_NAMES[kind]}, got {value!r}")
    backbone_config = hf_config.get("backbone_config") or {}
    for name, value in (
        ("backbone_config", backbone_config),
        ("id2label", hf_config.get("id2label")),
    ):
        if value is not None and not isinstance(value, dict):
            raise CheckpointError(config_file, f"{name} must be an object, got {value!r}")
    args = {
        "nheads": hf_config.get("encoder_attention_heads", 8),
        "dropout": hf_config.get("dropout", 0.1),
        "dilation": hf_config.get("dilation", False) or backbone_config.get("output_stride") == 16,
        "num_queries": hf_config.get("num_queries"),
        "enc_n_points": hf_config.get("encoder_n_points", 4),
        "dec_n_points": hf_config.get("decoder_n_points", 4),
    }
    if model_type == "deformable_detr":
        _untie_heads(state_dict)
    try:
        config = infer_config(path, state_dict, args)
    except (ValueError, TypeError) as error:  # its values, not the weights, cannot build one
        raise CheckpointError(config_file, f"cannot build a model from it: {error}") from None
    id2label = hf_config.get("id2label") or {}
    names = [id2label.get(str(i)) for i in range(config.num_classes)]
    if all(isinstance(name, str) for name in names):
        config.class_names = names
    return state_dict, config


def _untie_heads(state_dict: dict[str, Tensor]) -> None:
    """transformers saves tied heads once. Its tie table makes every layer's class (and box) head
    the first one unless the decoder owns them (box refinement, two-stage), so a head missing from
    the file is the first head, or the decoder's copy of it."""
    num_pred = layer_count(state_dict, "transformer.decoder.layers.") + (
        1 if "transformer.enc_output.weight" in state_dict else 0
    )
    for head in ("class_embed", "bbox_embed"):
        for index in range(num_pred):
            own = f"{head}.{index}."
            if any(key.startswith(own) for key in state_dict):
                continue
            source = f"transformer.decoder.{head}.{index}."
            if not any(key.startswith(source) for key in state_dict):
                source = f"{head}.0."
            for key in [k for k in state_dict if k.startswith(source)]:
                state_dict[own + key[len(source) :]] = state_dict[key]


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


# --- Writing: detrkit -> transformers -------------------------------------------------------------

# transformers' class for each kind it can hold.
TRANSFORMERS_CLASSES = {
    "detr": "DetrForObjectDetection",
    "detr_segmentation": "DetrForSegmentation",
    "deformable_detr": "DeformableDetrForObjectDetection",
}
TRANSFORMERS_FILES = ("config.json", HF_WEIGHT_FILES[0], "preprocessor_config.json")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "writing a transformers directory needs the transformers and timm packages "
            "(pip install transformers timm)"
        ) from None
    return transformers


def transformers_config(config: ModelConfig) -> Any:
    """The transformers config (``DetrConfig`` or ``DeformableDetrConfig``) of the model that
    ``config`` describes: its architecture, its class names as ``id2label`` and a timm ResNet
    backbone built without downloading weights. ValueError for a model transformers cannot hold.

    Where transformers' semantics differ it is set to compute what detrkit computes: DETR's
    ``auxiliary_loss`` is off (with it on, transformers feeds each decoder layer the normalised
    output of the previous one), and Deformable DETR's heads are not tied
    (``tie_word_embeddings=False``), so every decoder layer keeps its own class head."""
    transformers = _import_transformers()
    kind = config.model_type
    if kind not in TRANSFORMERS_CLASSES:
        raise ValueError(
            f"a {kind or type(config).__name__} model has no transformers counterpart; "
            f"transformers holds {', '.join(TRANSFORMERS_CLASSES)}"
        )
    if getattr(config, "pre_norm", False):
        raise ValueError(
            "a pre-norm DETR (pre_norm=True) has no transformers counterpart: transformers' "
            "DETR normalises after each block"
        )
    names = config.class_names or [f"class_{i}" for i in range(config.num_classes)]
    fields: dict[str, Any] = {
        "use_timm_backbone": True,
        "backbone": config.backbone,  # timm names its ResNets as torchvision does
        "use_pretrained_backbone": False,
        "dilation": config.dilation,
        "position_embedding_type": config.position_embedding,
        "d_model": config.hidden_dim,
        "encoder_attention_heads": config.nheads,
        "decoder_attention_heads": config.nheads,
        "encoder_layers": config.enc_layers,
        "decoder_layers": config.dec_layers,
        "encoder_ffn_dim": config.dim_feedforward,
        "decoder_ffn_dim": config.dim_feedforward,
        "dropout": config.dropout,
        "num_queries": config.num_queries,
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "architectures": [TRANSFORMERS_CLASSES[kind]],
    }
    if kind == "deformable_detr":
        fields.update(
            num_feature_levels=config.num_feature_levels,
            encoder_n_points=config.enc_n_points,
            decoder_n_points=config.dec_n_points,
            with_box_refine=config.with_box_refine,
            two_stage=config.two_stage,
            two_stage_num_proposals=config.num_queries,
            auxiliary_loss=config.aux_loss,
            tie_word_embeddings=False,
        )
        # transformers' own choice of backbone stages is C3-C5 or C5 alone; detrkit's model
        # takes the last min(levels, 3) stages, as the original does.
        stages = min(config.num_feature_levels, 3)
        for name in ("use_timm_backbone", "backbone", "use_pretrained_backbone"):
            del fields[name]
        fields["backbone_config"] = {
            "model_type": "timm_backbone",
            "backbone": config.backbone,
            "num_channels": 3,
            "features_only": True,
            "use_pretrained_backbone": False,
            "out_indices": list(range(5 - stages, 5)),
            **({"output_stride": 16} if config.dilation else {}),
        }
        return transformers.DeformableDetrConfig(**fields)
    return transformers.DetrConfig(auxiliary_loss=False, **fields)


def to_transformers(model: torch.nn.Module) -> Any:
    """A transformers model (in eval mode) holding ``model``'s weights: the inverse of reading a
    transformers directory. Every transformers parameter name is renamed by the reading tables
    (``RENAMES``) to the detrkit name it takes its tensor from, so both directions share one
    table. ValueError for a model transformers cannot hold."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("to_transformers() takes a detrkit model (one with a .config)")
    transformers = _import_transformers()
    hf_config = transformers_config(config)
    model_type = config.model_type
    hf = getattr(transformers, TRANSFORMERS_CLASSES[model_type])(hf_config)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights: dict[str, Tensor] = {}
    used: set[str] = set()
    problems = []
    for key, target in hf.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        renamed = _rename(key, model_type)
        match = _QKV.match(renamed) if renamed else None
        source = f"{match[1]}.in_proj_{match[3]}" if match else renamed
        if source not in ours:
            problems.append(f"{key} (detrkit has no {source})")
            continue
        tensor = ours[source]
        if match:  # q, k, v are the thirds of nn.MultiheadAttention's stacked projection
            tensor = tensor.chunk(3)["qkv".index(match[2])]
        if tensor.shape != target.shape:
            problems.append(f"{key} ({tuple(tensor.shape)} here, {tuple(target.shape)} there)")
            continue
        weights[key] = tensor.clone().contiguous()
        used.add(source)
    # A name that shares its tensor with a written one (tied heads) is written with it.
    shared = {name for names in shared_names(model) if used.intersection(names) for name in names}
    unused = [
        k
        for k in ours
        if k not in used and k not in shared and not k.endswith("num_batches_tracked")
    ]
    if unused:
        problems.append(f"detrkit parameters transformers has no place for: {format_names(unused)}")
    if problems:
        raise ValueError(
            f"cannot convert this {model_type} model to transformers {transformers.__version__}: "
            + "; ".join(problems[:6])
            + (f" and {len(problems) - 6} more" if len(problems) > 6 else "")
        )
    hf.load_state_dict(weights, strict=False)
    return hf.eval()


def save_transformers(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    overwrite: bool = False,
    resize: tuple[int, int] | None = None,
) -> Path:
    """Writes ``model`` as a transformers directory that ``from_pretrained`` of its class
    (``TRANSFORMERS_CLASSES``) loads: ``config.json``, ``model.safetensors`` and the image
    processor's ``preprocessor_config.json`` (transformers' DETR preprocessing, ImageNet's mean
    and std; images resized to ``resize``, ``(shorter side, longer side at most)``, by default
    transformers' 800 and 1333). Each file is written atomically; files of an earlier result are
    replaced only with ``overwrite`` (FileExistsError otherwise). ValueError for a model
    transformers cannot hold, before anything is written. Returns ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    existing_results([directory / name for name in TRANSFORMERS_FILES], str(directory), overwrite)
    hf = to_transformers(model)
    transformers = _import_transformers()
    processor_class = (
        transformers.DeformableDetrImageProcessor
        if model.config.model_type == "deformable_detr"
        else transformers.DetrImageProcessor
    )
    size = None if resize is None else {"shortest_edge": resize[0], "longest_edge": resize[1]}
    processor = processor_class(**({} if size is None else {"size": size}))
    weights = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(
        directory / HF_WEIGHT_FILES[0], lambda tmp: save_file(weights, tmp, {"format": "pt"})
    )
    write_text(directory / TRANSFORMERS_FILES[2], processor.to_json_string())
    # The config last: a directory with a config.json is one whole model.
    write_text(directory / TRANSFORMERS_FILES[0], hf.config.to_json_string())
    return directory
