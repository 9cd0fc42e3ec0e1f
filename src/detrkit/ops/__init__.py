"""Custom operators: multi-scale deformable attention (fused CPU kernel and PyTorch reference)."""

from detrkit.ops.dispatch import auto_implementation, fused_kernel_available, ms_deform_attn
from detrkit.ops.ms_deform_attn_portable import ms_deform_attn_portable
from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference

__all__ = [
    "auto_implementation",
    "fused_kernel_available",
    "ms_deform_attn",
    "ms_deform_attn_portable",
    "ms_deform_attn_reference",
]
