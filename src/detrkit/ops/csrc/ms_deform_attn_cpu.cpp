// Fused multi-scale deformable attention for CPU: forward and backward, as PyTorch operators.
// Layouts and the sampling convention are those of ms_deform_attn_sampling.h, which holds the
// forward computation this file shares with the ONNX Runtime operator.
//
// value, output and grad_output share one dtype. sampling_locations and attention_weights share
// either that dtype or, for bf16/fp16 values, fp32 (coord_t below): a location in bf16 is off by
// up to half a pixel on a 134-pixel-wide level, while the values are read as they are, with no
// fp32 copy of the whole memory.
//
// Arithmetic runs in at::opmath_type (fp32 for bf16/fp16, fp64 for fp64).

#include "kernels.h"
#include "ms_deform_attn_sampling.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

using namespace detrkit::deform;

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  // The Python wrapper gives the user-facing errors; these checks keep the raw pointer
  // arithmetic below in bounds even when it is bypassed (e.g. under torch.compile).
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn CPU kernel: all inputs must be on the CPU");
  }
  const auto coords = sampling_locations.scalar_type();
  TORCH_CHECK(attention_weights.scalar_type() == coords &&
                  (coords == value.scalar_type() || coords == at::toOpMathType(value.scalar_type())),
              "sampling_locations and attention_weights must share value's dtype or, for bf16/fp16 "
              "values, be fp32");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const auto dims = [](const at::Tensor& t) { return t.sizes().vec(); };
  Sizes s{};
  const char* problem = detrkit::deform::check_inputs(
      dims(value), dims(spatial_shapes), dims(level_start_index), dims(sampling_locations),
      dims(attention_weights), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
      s);
  TORCH_CHECK(problem == nullptr, problem);
  return s;
}

template <typename scalar_t, typename coord_t>
void forward_kernel(const Sizes& s, const scalar_t* value, const int64_t* spatial_shapes,
                    const int64_t* level_start_index, const coord_t* sampling_locations,
                    const coord_t* attention_weights, scalar_t* output) {
  at::parallel_for(0, s.N * s.Lq, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    forward_queries<scalar_t, coord_t, at::opmath_type<scalar_t>>(
        s, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        output, begin, end);
  });
}

// For one query and head and one channel block: scatter weight * grad_output into grad_value at
// every tap and accumulate grad_output . value[tap] into dots (summed over blocks by the caller).
template <int kVectors, typename scalar_t, typename coord_t, typename acc_t>
inline void scatter_block(const scalar_t* value_head, acc_t* grad_value_head,
                          const BilinearCorners<acc_t>* point_corners,
                          const coord_t* attention_weights, int64_t num_points,
                          const scalar_t* grad_output, int64_t d0, acc_t* dots) {
  if constexpr (kVectors == 0) {
    const acc_t g = static_cast<acc_t>(grad_output[d0]);
    for (int64_t i = 0; i < num_points; ++i) {
      const BilinearCorners<acc_t>& corners = point_corners[i];
      const acc_t attention = static_cast<acc_t>(attention_weights[i]);
      for (int c = 0; c < corners.count; ++c) {
        const int64_t offset = corners.offset[c] + d0;
        dots[i * 4 + c] += g * static_cast<acc_t>(value_head[offset]);
        grad_value_head[offset] += attention * corners.weight[c] * g;
      }
    }
  } else {
    lanes_t<acc_t> g[kVectors];
    for (int b = 0; b < kVectors; ++b) g[b] = load_lanes<acc_t>(grad_output + d0 + b * kLanes);
    for (int64_t i = 0; i < num_points; ++i) {
      const BilinearCorners<acc_t>& corners = point_corners[i];
      const acc_t attention = static_cast<acc_t>(attention_weights[i]);
      for (int c = 0; c < corners.count; ++c) {
        const int64_t offset = corners.offset[c] + d0;
        const scalar_t* v = value_head + offset;
        acc_t* gv = grad_value_head + offset;
        const acc_t w = attention * corners.weight[c];
        lanes_t<acc_t> dot = {};
        for (int b = 0; b < kVectors; ++b) {
          dot += g[b] * load_lanes<acc_t>(v + b * kLanes);
          store_lanes<acc_t>(gv + b * kLanes, load_lanes<acc_t>(gv + b * kLanes) + w * g[b]);
        }
        dots[i * 4 + c] += sum_lanes<acc_t>(dot);
      }
    }
  }
}

// Gradients of one query and head: scatters into the head's slice of grad_value, and writes
// the point's grad_sampling_locations and grad_attention_weights.
template <typename scalar_t, typename coord_t, typename acc_t>
inline void backward_query_head(const Sizes& s, int64_t point0, const scalar_t* value_head,
                                acc_t* grad_value_head, const int64_t* spatial_shapes,
                                const int64_t* level_start_index,
                                const coord_t* sampling_locations,
                                const coord_t* attention_weights, const scalar_t* grad_out,
                                BilinearCorners<acc_t>* point_corners, acc_t* dots,
                                coord_t* grad_sampling_locations,
                                coord_t* grad_attention_weights) {
  const int64_t num_points = s.L * s.P;
  for (int64_t l = 0; l < s.L; ++l) {
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t point = point0 + l * s.P + p;
      resolve_corners<acc_t>(sampling_locations[2 * point], sampling_locations[2 * point + 1],
                             spatial_shapes[2 * l], spatial_shapes[2 * l + 1],
                             level_start_index[l], s.M * s.D, point_corners[l * s.P + p]);
      const BilinearCorners<acc_t>& corners = point_corners[l * s.P + p];
      for (int c = 0; c < corners.count; ++c) {
        prefetch_row(value_head + corners.offset[c], s.D);
        prefetch_row(grad_value_head + corners.offset[c], s.D);
      }
    }
  }
  std::fill(dots, dots + num_points * 4, acc_t(0));
  for_each_channel_block(s.D, [&](auto block, int64_t d0) {
    scatter_block<decltype(block)::value>(value_head, grad_value_head, point_corners,
                                          attention_weights + point0, num_points, grad_out, d0,
                                          dots);
  });
  for (int64_t i = 0; i < num_points; ++i) {
    const BilinearCorners<acc_t>& corners = point_corners[i];
    acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
    for (int c = 0; c < corners.count; ++c) {
      grad_attention += corners.weight[c] * dots[i * 4 + c];
      grad_x += corners.dweight_dx[c] * dots[i * 4 + c];
      grad_y += corners.dweight_dy[c] * dots[i * 4 + c];
    }
    const int64_t point = point0 + i;
    const acc_t attention = static_cast<acc_t>(attention_weights[point]);
    const int64_t l = i / s.P;
    grad_attention_weights[point] = static_cast<coord_t>(grad_attention);
    // Locations are normalised: pixel x = loc_x * W - 0.5, so d/dloc_x = W * d/dx.
    grad_sampling_locations[2 * point] =
        static_cast<coord_t>(attention * grad_x * static_cast<acc_t>(spatial_shapes[2 * l + 1]));
    grad_sampling_locations[2 * point + 1] =
        static_cast<coord_t>(attention * grad_y * static_cast<acc_t>(spatial_shapes[2 * l]));
  }
}

// grad_value receives scatter-adds from every query that samples a pixel, so threads must not
// share its rows. The work items are (chunk, n, m): each thread takes a contiguous run of them,
// and a head's slice of grad_value is written only by the thread holding that (chunk, n, m).
// When there are fewer (n, m) pairs than threads, the queries are cut into chunks, each chunk
// with a private grad_value buffer summed afterwards. This needs no atomics, and
// grad_sampling_locations / grad_attention_weights, being per (n, q, m), are likewise owned by
// one thread. A thread walks its heads innermost, query by query, so that its reads of the
// per-query tensors stay sequential (a head-outer loop strides through them and thrashes the
// TLB). The buffer layout [C, N, S, M, D] makes the single-chunk case value's own layout.
template <typename scalar_t, typename coord_t>
void backward_kernel(const Sizes& s, int64_t num_chunks, const scalar_t* value,
                     const int64_t* spatial_shapes, const int64_t* level_start_index,
                     const coord_t* sampling_locations, const coord_t* attention_weights,
                     const scalar_t* grad_output, at::opmath_type<scalar_t>* grad_value_chunks,
                     coord_t* grad_sampling_locations, coord_t* grad_attention_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_stride = s.M * s.D;
  const int64_t num_points = s.L * s.P;
  const int64_t queries_per_chunk = (s.Lq + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_chunks * s.N * s.M, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearCorners<acc_t>> point_corners(num_points);
    std::vector<acc_t> dots(num_points * 4);  // grad_output . value[corner], per corner
    // Split [begin, end) into runs of heads m_begin..m_end sharing one (chunk, n).
    for (int64_t first = begin; first < end;) {
      const int64_t chunk = first / (s.N * s.M);
      const int64_t n = (first / s.M) % s.N;
      const int64_t m_begin = first % s.M;
      const int64_t m_end = std::min(s.M, m_begin + (end - first));
      first += m_end - m_begin;
      const scalar_t* value_n = value + n * s.S * row_stride;
      acc_t* grad_value_n = grad_value_chunks + (chunk * s.N + n) * s.S * row_stride;
      const int64_t q_end = std::min(s.Lq, (chunk + 1) * queries_per_chunk);
      for (int64_t q = chunk * queries_per_chunk; q < q_end; ++q) {
        const int64_t nq = n * s.Lq + q;
        for (int64_t m = m_begin; m < m_end; ++m) {
          backward_query_head<scalar_t, coord_t, acc_t>(
              s, (nq * s.M + m) * num_points, value_n + m * s.D, grad_value_n + m * s.D,
              spatial_shapes, level_start_index, sampling_locations, attention_weights,
              grad_output + (nq * s.M + m) * s.D, point_corners.data(), dots.data(),
              grad_sampling_locations, grad_attention_weights);
        }
      }
    }
  });
}

// Calls fn(coord_t{}) with coord_t the C++ type of sampling_locations' dtype, which
// check_inputs allows to be value's (scalar_t) or its accumulation type.
template <typename scalar_t, typename Fn>
inline void with_coord_type(const at::Tensor& sampling_locations, Fn&& fn) {
  using acc_t = at::opmath_type<scalar_t>;
  if (sampling_locations.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
    fn(scalar_t{});
  } else {
    fn(acc_t{});
  }
}

}  // namespace

namespace detrkit {

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  at::Tensor output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_forward", [&] {
        with_coord_type<scalar_t>(locations_c, [&](auto coord) {
          using coord_t = decltype(coord);
          forward_kernel<scalar_t, coord_t>(s, value_c.const_data_ptr<scalar_t>(),
                                            shapes_c.const_data_ptr<int64_t>(),
                                            starts_c.const_data_ptr<int64_t>(),
                                            locations_c.const_data_ptr<coord_t>(),
                                            weights_c.const_data_ptr<coord_t>(),
                                            output.mutable_data_ptr<scalar_t>());
        });
      });
  return output;
}

at::Tensor ms_deform_attn_projected_forward(const at::Tensor& value,
                                            const at::Tensor& spatial_shapes,
                                            const at::Tensor& level_start_index,
                                            const at::Tensor& reference_points,
                                            const at::Tensor& projection) {
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &reference_points, &projection}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn_projected: all inputs must be on the CPU");
  }
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D]");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "spatial_shapes must be int64 [L, 2]");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.scalar_type() == at::kLong &&
                  level_start_index.size(0) == spatial_shapes.size(0),
              "level_start_index must be int64 [L]");
  const int64_t N = value.size(0), M = value.size(2), L = spatial_shapes.size(0);
  TORCH_CHECK(reference_points.dim() == 4 && reference_points.size(0) == N &&
                  reference_points.size(2) == L && reference_points.size(3) == 2,
              "reference_points must be [N, Lq, L, 2]");
  const int64_t Lq = reference_points.size(1);
  TORCH_CHECK(projection.dim() == 3 && projection.size(0) == N && projection.size(1) == Lq &&
                  L > 0 && M > 0 && projection.size(2) % (3 * M * L) == 0,
              "projection must be [N, Lq, M * L * P * 3]");
  TORCH_CHECK(projection.scalar_type() == value.scalar_type(), "projection must be in value's dtype");
  TORCH_CHECK(reference_points.scalar_type() == at::toOpMathType(value.scalar_type()),
              "reference_points must be in value's accumulation dtype (fp32 for bf16 values)");
  Sizes s{N, value.size(1), M, value.size(3), Lq, L, projection.size(2) / (3 * M * L)};
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const char* problem = check_levels(shapes_c.const_data_ptr<int64_t>(),
                                     starts_c.const_data_ptr<int64_t>(), s.L, s.S);
  TORCH_CHECK(problem == nullptr, problem);
  const at::Tensor value_c = value.contiguous();
  const at::Tensor reference_c = reference_points.contiguous();
  const at::Tensor projection_c = projection.contiguous();
  at::Tensor output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (output.numel() == 0 || s.P == 0) return output.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_projected_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ProjectedPoints<scalar_t, acc_t> locate(
            s, projection_c.const_data_ptr<scalar_t>(), reference_c.const_data_ptr<acc_t>(),
            shapes_c.const_data_ptr<int64_t>());
        at::parallel_for(0, s.N * s.Lq, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
          forward_queries_located<scalar_t, acc_t>(
              s, value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
              starts_c.const_data_ptr<int64_t>(), locate, output.mutable_data_ptr<scalar_t>(),
              begin, end);
        });
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  TORCH_CHECK(grad_output.device().is_cpu() && grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be a CPU tensor of value's dtype");
  TORCH_CHECK(grad_output.numel() == s.N * s.Lq * s.M * s.D, "grad_output must be [N, Lq, M * D]");
  const at::Tensor value_c = value.contiguous();
  const at::Tensor shapes_c = spatial_shapes.contiguous();
  const at::Tensor starts_c = level_start_index.contiguous();
  const at::Tensor locations_c = sampling_locations.contiguous();
  const at::Tensor weights_c = attention_weights.contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();

  // Extra query chunks only pay off when the (n, m) pairs cannot occupy every thread, and each
  // costs a private copy of grad_value, so there are never more than needed nor tiny ones.
  const int64_t pairs = s.N * s.M;
  const int64_t threads = at::get_num_threads();
  int64_t num_chunks = 1;
  if (pairs > 0 && pairs < threads) {
    num_chunks = std::max<int64_t>(1, std::min((threads + pairs - 1) / pairs, s.Lq / 64));
  }

  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_chunks =
      at::zeros({num_chunks, s.N, s.S, s.M, s.D}, value.options().dtype(acc_dtype));
  // Every point's gradient is written by the kernel, so these need no zero fill.
  at::Tensor grad_sampling_locations = at::empty_like(locations_c);
  at::Tensor grad_attention_weights = at::empty_like(weights_c);
  if (weights_c.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_backward", [&] {
          with_coord_type<scalar_t>(locations_c, [&](auto coord) {
            using coord_t = decltype(coord);
            backward_kernel<scalar_t, coord_t>(
                s, num_chunks, value_c.const_data_ptr<scalar_t>(),
                shapes_c.const_data_ptr<int64_t>(), starts_c.const_data_ptr<int64_t>(),
                locations_c.const_data_ptr<coord_t>(), weights_c.const_data_ptr<coord_t>(),
                grad_output_c.const_data_ptr<scalar_t>(),
                grad_value_chunks.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                grad_sampling_locations.mutable_data_ptr<coord_t>(),
                grad_attention_weights.mutable_data_ptr<coord_t>());
          });
        });
  }
  at::Tensor grad_value = num_chunks == 1 ? grad_value_chunks[0] : grad_value_chunks.sum(0);
  return {grad_value.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
}

}  // namespace detrkit
