"""Accelerations, applied by substitution.

:mod:`detrkit.models` is the reference computation, written as the papers read. Here each of its
modules that has a faster form gets a subclass that computes the same thing faster (fused
kernels, folded batch norm, merged projections, chunking, layouts) and takes over the reference
module's parameters as they are, so names, state dict and checkpoints do not change.
:func:`optimize_for_inference` returns such a copy for inference; :func:`optimize_for_training`
swaps a model's modules in place for training. :func:`to_reference` turns a model back. Every
fast module is tested against its reference (tests/test_fast.py).
"""

from detrkit.fast.inference import PRECISIONS, optimize_for_inference, precision_dtype
from detrkit.fast.substitution import adopt, substitute, to_reference
from detrkit.fast.training import optimize_for_training

__all__ = [
    "PRECISIONS",
    "adopt",
    "optimize_for_inference",
    "optimize_for_training",
    "precision_dtype",
    "substitute",
    "to_reference",
]
