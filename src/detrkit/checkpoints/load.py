"""``detrkit.load``: one entry point for every checkpoint format detrkit reads."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrkit.checkpoints.errors import CheckpointError, format_names
from detrkit.checkpoints.huggingface import is_hf_directory, read_hf_directory
from detrkit.checkpoints.native import (
    config_from_dict,
    is_native_directory,
    read_native_directory,
    read_safetensors,
    shared_names,
)
from detrkit.checkpoints.official import infer_config, read_torch_file, split_official
from detrkit.models.config import ModelConfig
from detrkit.models.presets import model_from_config

# Parameters of the class head: the ones a fine-tuning run with a new class count starts afresh.
CLASS_HEAD_PREFIXES = ("class_embed.", "transformer.decoder.class_embed.")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; ValueError naming it when torch knows no such device or
    it is a GPU this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device torch knows ({error})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available here")
    return parsed


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Reads any supported checkpoint into (state dict with official names, config)."""
    check_device(map_location)  # else torch.load's complaint would read as a corrupt file
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_dir():
        if is_native_directory(path):
            return read_native_directory(path, map_location)
        if is_hf_directory(path):
            return read_hf_directory(path, map_location)
        raise CheckpointError(
            path,
            "unknown format: a directory needs detrkit.json (detrkit.save) or config.json "
            "(Hugging Face save_pretrained) with its weights",
        )
    if path.suffix == ".safetensors":  # official names in a bare safetensors file
        state_dict = read_safetensors(path, map_location)
        return state_dict, infer_config(path, state_dict, {})
    checkpoint = read_torch_file(path, map_location)
    state_dict, args = split_official(path, checkpoint)
    if isinstance(checkpoint.get("model_config"), dict):  # written by detrkit's training
        if isinstance(checkpoint.get("ema"), dict):
            state_dict = averaged_weights(path, checkpoint["ema"])
        return state_dict, config_from_dict(path, checkpoint["model_config"])
    return state_dict, infer_config(path, state_dict, args)


def averaged_weights(path: Path, ema_state: dict[str, Any]) -> dict[str, Tensor]:
    """The model's weights in the state of a training run's ``AveragedModel`` (its EMA): the
    weights the run evaluated and drew its predictions with, so the ones a loaded checkpoint
    should give. The raw weights stay in the checkpoint's ``"model"`` entry for resuming."""
    prefix = "module."
    weights = {k[len(prefix) :]: v for k, v in ema_state.items() if k.startswith(prefix)}
    if not weights or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(path, "its 'ema' entry holds no averaged model weights")
    return weights


def load_weights(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    path: str | os.PathLike,
    reset_class_head: bool = False,
) -> None:
    """Loads ``state_dict`` into ``model`` after checking that every name and shape fits, so that
    a mismatch is reported completely instead of one key at a time."""
    expected = model.state_dict()
    # Batch-norm step counters are bookkeeping, not weights: ignore them when one side lacks them.
    counter = "num_batches_tracked"
    state_dict = {
        k: v for k, v in state_dict.items() if not (k.endswith(counter) and k not in expected)
    }
    for names in shared_names(model):
        stored = [name for name in names if name in state_dict]
        for name in names:
            if stored:
                state_dict.setdefault(name, state_dict[stored[0]])
    if reset_class_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASS_HEAD_PREFIXES)}
    missing = [
        k
        for k in expected
        if k not in state_dict
        and not k.endswith(counter)
        and not (reset_class_head and k.startswith(CLASS_HEAD_PREFIXES))
    ]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {format_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {format_names(unexpected)}")
    if mismatched:
        problems.append(f"shapes that do not fit: {format_names(mismatched, limit=6)}")
        if all(m.startswith(CLASS_HEAD_PREFIXES) for m in mismatched):
            problems.append(
                "the checkpoint has a different number of classes; to fine-tune with a new class "
                "head, load it with detrkit.load(path, num_classes=N, reset_class_head=True)"
            )
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)  # every name was checked above


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    reset_class_head: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Loads a ready model, in eval mode, from an official DETR checkpoint (.pth), a Hugging Face
    ``save_pretrained`` directory or a directory written by :func:`detrkit.save`.

    ``overrides`` change config fields the weights cannot tell (``dilation``, ``nheads``) or, with
    ``reset_class_head=True``, the number of classes (the class head is then freshly initialised).
    Raises :class:`CheckpointError` naming the file and the problem for any bad input.
    """
    state_dict, config = read_checkpoint(path, map_location)
    if "num_classes" in overrides and overrides["num_classes"] != config.num_classes:
        # Names, ids and the thing/stuff split were the old classes'.
        labels = {"class_names": None, "category_ids": None}
        if hasattr(config, "is_thing"):
            labels["is_thing"] = None
        config = dataclasses.replace(config, **labels)
    try:
        config = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as error:
        raise CheckpointError(path, f"invalid override: {error}") from None
    model = model_from_config(config)
    load_weights(model, state_dict, path, reset_class_head=reset_class_head)
    return model.to(map_location).eval()


# Fields every training run's config has; a config.json without them is another program's
# (e.g. a Hugging Face config.json).
_TRAINING_CONFIG_FIELDS = {"image_scale", "model", "data"}


def training_run_config(path: str | os.PathLike) -> tuple[dict[str, Any], Path] | None:
    """The training config of the ``detrkit train`` run that wrote the checkpoint at ``path``
    and where it was read: the checkpoint's own ``train_config`` entry, else the run's
    ``config.json`` beside it (for a directory saved into a run directory). None for weights
    that no training run of detrkit wrote."""
    path = Path(path)
    if path.is_file() and path.suffix != ".safetensors":
        checkpoint = read_torch_file(path)
        stored = checkpoint.get("train_config") if isinstance(checkpoint, dict) else None
        if isinstance(stored, dict):
            return stored, path
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or not set(values) >= _TRAINING_CONFIG_FIELDS:
        return None
    return values, config_file
