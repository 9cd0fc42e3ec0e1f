"""detrkit: DETR and Deformable DETR, faithful to the originals and loadable from their checkpoints."""

from detrkit.checkpoints import CheckpointError, load, save
from detrkit.data import pad_images
from detrkit.deploy import ExportError, export
from detrkit.fast import optimize_for_inference
from detrkit.inference import Detector
from detrkit.loss import HungarianMatcher, SetCriterion
from detrkit.models import DETRConfig, PostProcess, available_models, build_model
from detrkit.version import __version__

__all__ = [
    "CheckpointError",
    "DETRConfig",
    "Detector",
    "ExportError",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "__version__",
    "available_models",
    "build_model",
    "export",
    "load",
    "optimize_for_inference",
    "pad_images",
    "save",
]
