"""detrkit's own format: a directory with ``model.safetensors`` and ``detrkit.json`` (the config)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detrkit.checkpoints.errors import CheckpointError
from detrkit.files import write_atomically, write_json
from detrkit.models.config import ModelConfig
from detrkit.models.kinds import KINDS
from detrkit.version import __version__

CONFIG_FILE = "detrkit.json"
WEIGHTS_FILE = "model.safetensors"
# The metadata entry of the weights file that repeats the config of detrkit.json.
CONFIG_KEY = "detrkit_config"
FORMAT_VERSION = 1


def shared_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that hold the same tensor (a module used under several names,
    like Deformable DETR's shared heads). Files may store such a tensor once."""
    groups: dict[tuple[int, torch.Size], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault((tensor.data_ptr(), tensor.shape), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def is_native_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Saves ``model`` (weights and config) to ``directory`` in detrkit's format; returns it."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig) or config.model_type not in KINDS:
        raise TypeError("save() takes a detrkit model (one with a .config built by build_model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A tensor shared by several names is stored once; loading fills in the other names.
    aliases = {name for names in shared_names(model) for name in names[1:]}
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases
    }
    meta = {
        "format": "detrkit",
        "format_version": FORMAT_VERSION,
        "detrkit_version": __version__,
        "config": config.to_dict(),
    }
    # The weights carry their config too: each file is replaced atomically, but not the pair, so
    # a save interrupted between the two would leave new weights beside an old config.
    weights_meta = {CONFIG_KEY: json.dumps(meta["config"], sort_keys=True)}
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, weights_meta))
    write_json(directory / CONFIG_FILE, meta, indent=2)
    return directory


def read_safetensors(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file; a damaged file raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(path, f"not a readable safetensors file: {error}") from None


def config_from_dict(path: Path, values: dict[str, Any]) -> ModelConfig:
    """The config a ``ModelConfig.to_dict()`` wrote; errors name ``path``."""
    if not isinstance(values, dict):
        raise CheckpointError(path, f"the model config must be an object, got {values!r}")
    model_type = values.get("model_type", "detr")
    if model_type not in KINDS:
        raise CheckpointError(path, f"unknown model_type {model_type!r}")
    try:
        return KINDS[model_type].config_class.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(path, f"invalid config: {error}") from None


def read_native_directory(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], ModelConfig]:
    config_file = path / CONFIG_FILE
    try:
        meta = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(config_file, f"not a readable JSON config: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != "detrkit":
        raise CheckpointError(config_file, 'not a detrkit config (no "format": "detrkit")')
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(config_file, f"format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            config_file,
            f"format version {meta['format_version']} is newer than this detrkit "
            f"reads ({FORMAT_VERSION}); upgrade detrkit",
        )
    config = config_from_dict(config_file, meta.get("config", {}))

    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(path, f"no {WEIGHTS_FILE} next to {CONFIG_FILE}")
    state_dict = read_safetensors(weights_file, map_location)
    saved_with = _config_saved_with(weights_file)
    if saved_with is not None and saved_with != meta.get("config"):
        raise CheckpointError(
            path,
            f"{WEIGHTS_FILE} was saved with another config than {CONFIG_FILE} holds (an "
            "interrupted save?); save the model again",
        )
    return state_dict, config


def _config_saved_with(weights_file: Path) -> dict[str, Any] | None:
    """The config stored in the weights file's metadata (None for files saved before it was)."""
    from safetensors import safe_open

    with safe_open(weights_file, "pt") as weights:  # read_safetensors has checked the file
        stored = (weights.metadata() or {}).get(CONFIG_KEY)
    return None if stored is None else json.loads(stored)
