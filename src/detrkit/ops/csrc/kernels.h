// The CPU kernels that bindings.cpp exposes to Python, one source file per operator.
#pragma once

// Only the Tensor class: the kernels include the few ATen headers they use, and bindings.cpp
// pybind's Tensor conversions, because torch/extension.h adds about 25 s of compile per file.
#include <ATen/core/Tensor.h>

#include "vector_lanes.h"

#include <tuple>

// torch's bf16 is widened and narrowed by the vector helpers' bit shifts.
template <>
struct detrkit::simd::is_bfloat16<c10::BFloat16> : std::true_type {};

namespace detrkit {

// ms_deform_attn_cpu.cpp
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights);
at::Tensor ms_deform_attn_projected_forward(const at::Tensor& value,
                                            const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index,
                                            const at::Tensor& reference_points,
                                            const at::Tensor& projection);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

// dropout_cpu.cpp
at::Tensor dropout_apply(const at::Tensor& input, double p, int64_t seed);
at::Tensor relu_dropout_apply(const at::Tensor& input, double p, int64_t seed);
at::Tensor relu_dropout_in_place(const at::Tensor& input, double p, int64_t seed);
at::Tensor relu_dropout_backward(const at::Tensor& grad_output, const at::Tensor& output,
                                 double p, bool in_place);

// winograd_cpu.cpp
at::Tensor winograd_input_transform(const at::Tensor& input);
at::Tensor winograd_output_transform(const at::Tensor& products, const at::Tensor& bias,
                                     int64_t batch, int64_t height, int64_t width);

// layer_norm_cpu.cpp
void add_layer_norm_out(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, at::Tensor& out);

// attention_cpu.cpp
bool attention_kernel_available();
at::Tensor attention_forward(const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, int64_t heads,
                             const std::optional<at::Tensor>& key_padding_mask);

// image_layout_cpu.cpp
bool image_layout_kernel_available();
at::Tensor rgb_planes_to_channels_last_bf16(const at::Tensor& images);

// max_pool_cpu.cpp
at::Tensor max_pool2d_channels_last(const at::Tensor& input, int64_t kernel_h, int64_t kernel_w,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                    int64_t pad_w);

}  // namespace detrkit
