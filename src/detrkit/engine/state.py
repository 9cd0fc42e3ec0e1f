"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a torch file readable with ``weights_only=True`` (tensors, numbers, strings, lists
and dicts only), written atomically, and also a model checkpoint that :func:`detrkit.load` reads.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detrkit.checkpoints.official import read_torch_file
from detrkit.files import write_atomically

CHECKPOINT_NAME = "checkpoint.pth"


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step draws from."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` atomically: a crash leaves the previous checkpoint intact."""
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_training_state` (no pickled code runs)."""
    return read_torch_file(path, map_location)
