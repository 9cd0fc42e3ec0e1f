"""Set prediction loss: Hungarian matching and the criterion built on it."""

from detrkit.loss.criterion import SetCriterion, build_criterion
from detrkit.loss.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "SetCriterion", "build_criterion"]
