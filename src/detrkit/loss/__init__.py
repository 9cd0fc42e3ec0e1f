"""Set prediction loss: Hungarian matching and the criterion built on it."""

from detrkit.loss.criterion import SetCriterion, build_criterion
from detrkit.loss.denoising import Denoiser
from detrkit.loss.matcher import HungarianMatcher

__all__ = ["Denoiser", "HungarianMatcher", "SetCriterion", "build_criterion"]
