"""The one exception type for checkpoints that cannot be read or do not fit."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, of an unknown format, or does not fit the model.

    The message always names the file and the problem.
    """

    def __init__(self, path: str | PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def format_names(names: Iterable[str], limit: int = 12) -> str:
    """A readable, bounded list of (parameter) names for error messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")
