// Python bindings of detrkit's CPU kernels (one extension module, built on first use).
#include "kernels.h"

#include <torch/csrc/utils/pybind.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "detrkit CPU kernels: multi-scale deformable attention, dropout, Winograd transforms, max "
      "pooling, residual addition with LayerNorm, bf16 attention, image layout";
  m.def("forward", &detrkit::ms_deform_attn_forward,
        "ms_deform_attn forward: output [N, Lq, M * D]");
  m.def("projected_forward", &detrkit::ms_deform_attn_projected_forward,
        "ms_deform_attn forward whose locations and weights come from the queries' projection "
        "(offsets, then logits) and reference points: output [N, Lq, M * D]");
  m.def("backward", &detrkit::ms_deform_attn_backward,
        "ms_deform_attn backward: (grad_value, grad_sampling_locations, grad_attention_weights)");
  m.def("dropout", &detrkit::dropout_apply,
        "input * keep * 1 / (1 - p), keep drawn from (seed, element index)");
  m.def("relu_dropout", &detrkit::relu_dropout_apply, "dropout(relu(input)) in one pass");
  m.def("relu_dropout_", &detrkit::relu_dropout_in_place,
        "relu_dropout written over its (contiguous) input");
  m.def("relu_dropout_backward", &detrkit::relu_dropout_backward,
        "relu_dropout's input gradient from its output: grad * scale where output > 0; written "
        "over grad_output when in_place");
  m.def("winograd_input_transform", &detrkit::winograd_input_transform,
        "[N, H, W, C] -> the 36 transformed [P, C] planes of F(4x4, 3x3)");
  m.def("winograd_output_transform", &detrkit::winograd_output_transform,
        "the 36 [P, C_out] product planes, bias -> [N, H, W, C_out]");
  m.def("add_layer_norm_out", &detrkit::add_layer_norm_out,
        "out = layer_norm(x + residual) over the last axis of [rows, C] tensors");
  m.def("attention_kernel_available", &detrkit::attention_kernel_available,
        "whether attention_forward runs here (AMX bf16 products)");
  m.def("attention_forward", &detrkit::attention_forward,
        "softmax(Q K^T / sqrt(d)) V per head of bf16 [B, L, C] tensors, keys where "
        "key_padding_mask is True left out: [B, Lq, C]");
  m.def("image_layout_kernel_available", &detrkit::image_layout_kernel_available,
        "whether rgb_planes_to_channels_last_bf16 runs here (AVX-512 BF16)");
  m.def("rgb_planes_to_channels_last_bf16", &detrkit::rgb_planes_to_channels_last_bf16,
        "fp32 [N, 3, H, W] images into bf16 channels-last memory in one pass");
  m.def("max_pool2d_channels_last", &detrkit::max_pool2d_channels_last,
        "max pooling of a channels-last [N, C, H, W] tensor (floor mode), without indices");
}
