"""Custom operators: multi-scale deformable attention (fused CPU kernel and PyTorch reference; in
CPU inference also with its sampling points computed inside the kernel), dropout with a fast CPU
mask (alone, and inside the transformer's MLP for training), Winograd 3x3 convolutions, max
pooling without indices, a residual addition with its LayerNorm, multi-head attention (AMX,
bf16) and images into channels-last bf16 for CPU inference,
convolutions and linear layers with bias and ReLU fused by oneDNN for bf16 inference
(:mod:`detrkit.ops.onednn`), and deformable attention as a node of ONNX Runtime and OpenVINO
(:mod:`detrkit.ops.runtime_ops`)."""

from detrkit.ops import onednn
from detrkit.ops._validation import coordinate_dtype_for
from detrkit.ops.dispatch import (
    attention_implementation,
    auto_implementation,
    fused_kernel_available,
    ms_deform_attn,
    native_bf16,
)
from detrkit.ops.dot_product_attention import (
    dot_product_attention,
    dot_product_kernel_applies,
)
from detrkit.ops.fast_dropout import Dropout, dropout, relu_dropout
from detrkit.ops.feed_forward import relu_dropout_mlp
from detrkit.ops.image_layout import to_channels_last
from detrkit.ops.layer_norm import add_layer_norm
from detrkit.ops.max_pool import max_pool2d
from detrkit.ops.ms_deform_attn_onnx import (
    ATTENTION_OPS,
    ONNX_DOMAIN,
    ms_deform_attn_onnx,
    onnx_translation_table,
)
from detrkit.ops.ms_deform_attn_portable import ms_deform_attn_portable
from detrkit.ops.ms_deform_attn_projected import ms_deform_attn_projected, projected_kernel_applies
from detrkit.ops.ms_deform_attn_reference import ms_deform_attn_reference
from detrkit.ops.runtime_ops import RuntimeLibraryError, onnxruntime_library, openvino_extension
from detrkit.ops.winograd import WinogradConv2d, winograd_conv2d, winograd_weight

__all__ = [
    "ATTENTION_OPS",
    "ONNX_DOMAIN",
    "Dropout",
    "RuntimeLibraryError",
    "WinogradConv2d",
    "add_layer_norm",
    "attention_implementation",
    "auto_implementation",
    "coordinate_dtype_for",
    "dot_product_attention",
    "dot_product_kernel_applies",
    "dropout",
    "fused_kernel_available",
    "max_pool2d",
    "ms_deform_attn",
    "ms_deform_attn_onnx",
    "ms_deform_attn_portable",
    "ms_deform_attn_projected",
    "ms_deform_attn_reference",
    "native_bf16",
    "onednn",
    "onnx_translation_table",
    "onnxruntime_library",
    "openvino_extension",
    "projected_kernel_applies",
    "relu_dropout",
    "relu_dropout_mlp",
    "to_channels_last",
    "winograd_conv2d",
    "winograd_weight",
]
