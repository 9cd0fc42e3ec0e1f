"""Reading and writing checkpoints: official files, Hugging Face directories, detrkit's own."""

from detrkit.checkpoints.errors import CheckpointError
from detrkit.checkpoints.finite import (
    NonFiniteError,
    require_finite_outputs,
    require_finite_weights,
)
from detrkit.checkpoints.load import load, read_checkpoint
from detrkit.checkpoints.native import save

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "load",
    "read_checkpoint",
    "require_finite_outputs",
    "require_finite_weights",
    "save",
]
