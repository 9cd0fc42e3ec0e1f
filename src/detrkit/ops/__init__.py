"""Custom operators: multi-scale deformable attention (fused CPU kernel and PyTorch reference) and
dropout with a fast CPU mask."""

from detrkit.ops.dispatch import auto_implementation, fused_kernel_available, ms_deform_attn
from detrkit.ops.fast_dropout import Dropout, dropout, relu_dropout
from detrkit.ops.ms_deform_attn_portable import ms_deform_attn_portable
from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference

__all__ = [
    "Dropout",
    "auto_implementation",
    "dropout",
    "fused_kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_portable",
    "ms_deform_attn_reference",
    "relu_dropout",
]
