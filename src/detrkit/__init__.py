"""detrkit: DETR and Deformable DETR, faithful to the originals and loadable from their checkpoints."""

from detrkit.checkpoints import CheckpointError, load, save
from detrkit.models import DETRConfig, available_models, build_model

from detrkit.version import __version__

__all__ = [
    "CheckpointError",
    "DETRConfig",
    "__version__",
    "available_models",
    "build_model",
    "load",
    "save",
]
