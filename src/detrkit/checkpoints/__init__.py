"""Reading and writing checkpoints: official files, Hugging Face directories, detrkit's own."""

from detrkit.checkpoints.errors import CheckpointError
from detrkit.checkpoints.load import load, read_checkpoint
from detrkit.checkpoints.native import save

__all__ = ["CheckpointError", "load", "read_checkpoint", "save"]
