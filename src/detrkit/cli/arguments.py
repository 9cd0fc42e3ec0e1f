"""The argparse types of the command line's options: each refuses a bad value with a message
that the parser prints as ``detrkit: error: argument --NAME: ...``."""

from __future__ import annotations

import argparse
import json


def _number(text: str, kind: type, description: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = _number(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def threshold(text: str) -> float:
    """A score threshold, between 0 and 1."""
    value = _number(text, float, "a number between 0 and 1")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def pixel(text: str) -> tuple[float, float]:
    """``X,Y``: a point in image pixels."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in image pixels, got {text!r}") from None


def model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for a model config field: JSON values, True/False, or a bare string (the
    config then checks its kind)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model-option {text!r}: expected KEY=VALUE")
    if value.lower() in ("true", "false"):  # Python's spelling as well as JSON's
        return key, value.lower() == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string such as resnet18
