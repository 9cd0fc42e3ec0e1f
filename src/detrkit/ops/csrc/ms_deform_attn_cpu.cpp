// Fused multi-scale deformable attention for CPU: forward and backward.
//
// Layouts (all contiguous):
//   value               [N, S, M, D]        S = sum_l H_l * W_l, levels flattened row-major
//   spatial_shapes      [L, 2] int64        (H, W) per level
//   level_start_index   [L]    int64        first row of each level in S
//   sampling_locations  [N, Lq, M, L, P, 2] normalised (x, y)
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
//
// value, output and grad_output share one dtype. sampling_locations and attention_weights share
// either that dtype or, for bf16/fp16 values, fp32 (coord_t below): a location in bf16 is off by
// up to half a pixel on a 134-pixel-wide level, while the values are read as they are, with no
// fp32 copy of the whole memory.
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): pixel
// centre i lies at (i + 0.5) / size, and a bilinear corner that falls off the map reads zero.
// Arithmetic runs in at::opmath_type (fp32 for bf16/fp16, fp64 for fp64).

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// A sampling point resolved against one level: its in-map bilinear corners, each with its
// weight and the weight's derivatives with respect to the pixel coordinates x and y.
template <typename acc_t>
struct BilinearCorners {
  int count = 0;
  int64_t offset[4];  // (row of value's S axis) * row_stride
  acc_t weight[4];
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];

  void set(int c, int64_t off, acc_t w, acc_t dw_dx, acc_t dw_dy) {
    offset[c] = off;
    weight[c] = w;
    dweight_dx[c] = dw_dx;
    dweight_dy[c] = dw_dy;
  }

  void add_if_inside(int64_t cx, int64_t cy, int64_t height, int64_t width, int64_t start,
                     int64_t row_stride, acc_t w, acc_t dw_dx, acc_t dw_dy) {
    if (cx < 0 || cy < 0 || cx >= width || cy >= height) return;
    set(count++, (start + cy * width + cx) * row_stride, w, dw_dx, dw_dy);
  }
};

template <typename acc_t>
inline void resolve_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                            int64_t start, int64_t row_stride, BilinearCorners<acc_t>& corners) {
  corners.count = 0;
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Past these bounds every corner is off the map; rejecting early also keeps floor() of huge
  // values or NaN away from the int64 conversion.
  if (!(x >= acc_t(-1) && y >= acc_t(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    if (std::isnan(x) || std::isnan(y)) {
      // Like grid_sample, a NaN location poisons the result instead of vanishing silently.
      const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
      corners.count = 1;
      corners.set(0, 0, nan, nan, nan);
    }
    return;
  }
  const acc_t x0f = std::floor(x);
  const acc_t y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const acc_t fx = x - x0f;
  const acc_t fy = y - y0f;
  const acc_t gx = acc_t(1) - fx;
  const acc_t gy = acc_t(1) - fy;
  if (x0 >= 0 && y0 >= 0 && x0 + 1 < width && y0 + 1 < height) {
    // Interior, by far the common case: all four corners, without testing each.
    const int64_t top_left = (start + y0 * width + x0) * row_stride;
    const int64_t below = width * row_stride;
    corners.count = 4;
    corners.set(0, top_left, gx * gy, -gy, -gx);
    corners.set(1, top_left + row_stride, fx * gy, gy, -fx);
    corners.set(2, top_left + below, gx * fy, -fy, gx);
    corners.set(3, top_left + below + row_stride, fx * fy, fy, fx);
    return;
  }
  corners.add_if_inside(x0, y0, height, width, start, row_stride, gx * gy, -gy, -gx);
  corners.add_if_inside(x0 + 1, y0, height, width, start, row_stride, fx * gy, gy, -fx);
  corners.add_if_inside(x0, y0 + 1, height, width, start, row_stride, gx * fy, -fy, gx);
  corners.add_if_inside(x0 + 1, y0 + 1, height, width, start, row_stride, fx * fy, fy, fx);
}

// Asks for a value (or grad_value) row ahead of its use: the taps of a query land on scattered
// rows, and issuing all their loads early overlaps the cache misses.
template <typename T>
inline void prefetch_row(const T* row, int64_t channels) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = std::min<int64_t>(channels * sizeof(T), 256);
  for (int64_t b = 0; b < size; b += 64) __builtin_prefetch(bytes + b);
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  // The Python wrapper gives the user-facing errors; these checks keep the raw pointer
  // arithmetic below in bounds even when it is bypassed (e.g. under torch.compile).
  for (const at::Tensor* t :
       {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn CPU kernel: all inputs must be on the CPU");
  }
  TORCH_CHECK(value.dim() == 4, "value must be [N, S, M, D]");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be [N, Lq, M, L, P, 2]");
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be [N, Lq, M, L, P]");
  const auto coords = sampling_locations.scalar_type();
  TORCH_CHECK(attention_weights.scalar_type() == coords &&
                  (coords == value.scalar_type() || coords == at::toOpMathType(value.scalar_type())),
              "sampling_locations and attention_weights must share value's dtype or, for bf16/fp16 "
              "values, be fp32");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  const Sizes s{value.size(0),
                value.size(1),
                value.size(2),
                value.size(3),
                sampling_locations.size(1),
                sampling_locations.size(3),
                sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
              "sampling_locations does not match value's N and M");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must match sampling_locations[..., 0]");
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.L &&
                  spatial_shapes.size(1) == 2,
              "spatial_shapes must be [L, 2]");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "level_start_index must be [L]");
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "spatial_shapes must be positive");
    TORCH_CHECK(start[l] == total, "level_start_index must be the exclusive cumsum of H * W");
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK(total == s.S, "value's S must equal the sum of H * W over spatial_shapes");
  return s;
}

// Channels are processed as vectors of 8 lanes of the accumulation type (GCC/Clang vector
// extensions). Spelled out because, left to itself, the compiler vectorised the loop over taps
// with gathers instead of the contiguous channels, and kept the accumulators in memory.
constexpr int kLanes = 8;

template <typename acc_t>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(kLanes * sizeof(acc_t))));
};
template <typename acc_t>
using lanes_t = typename Lanes<acc_t>::type;

template <typename acc_t, typename scalar_t>
inline lanes_t<acc_t> load_lanes(const scalar_t* p) {
  lanes_t<acc_t> x;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&x, p, sizeof(x));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // bf16 is the upper half of an fp32: widening is a shift, exact and vectorisable.
    typedef uint16_t bits16 __attribute__((vector_size(kLanes * 2)));
    typedef uint32_t bits32 __attribute__((vector_size(kLanes * 4)));
    bits16 narrow;
    std::memcpy(&narrow, p, sizeof(narrow));
    const bits32 wide = __builtin_convertvector(narrow, bits32) << 16;
    std::memcpy(&x, &wide, sizeof(x));
  } else {
    for (int i = 0; i < kLanes; ++i) x[i] = static_cast<acc_t>(p[i]);
  }
  return x;
}

template <typename acc_t>
inline void store_lanes(acc_t* p, const lanes_t<acc_t>& x) {
  std::memcpy(p, &x, sizeof(x));
}

template <typename acc_t>
inline acc_t sum_lanes(const lanes_t<acc_t>& x) {
  acc_t total = 0;
  for (int i = 0; i < kLanes; ++i) total += x[i];
  return total;
}

// Splits D channels into blocks of kVectors * kLanes with a compile-time size, so that a block's
// accumulators stay in registers across all taps: 4 vectors (32 channels, Deformable DETR's
// D), then single vectors, then a scalar tail (kVectors = 0, one channel).
template <typename Fn>
inline void for_each_channel_block(int64_t D, Fn&& fn) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) fn(std::integral_constant<int, 4>{}, d0);
  for (; d0 + kLanes <= D; d0 += kLanes) fn(std::integral_constant<int, 1>{}, d0);
  for (; d0 < D; ++d0) fn(std::integral_constant<int, 0>{}, d0);
}

// One in-map corner of one sampling point: where to read and with which total weight.
template <typename acc_t>
struct Tap {
  int64_t offset;  // into the head's value slice: row * M * D
  acc_t weight;    // attention weight * bilinear weight
};

// out[d0 : d0 + block] = sum over taps of weight * value[tap, d0 : d0 + block]
template <int kVectors, typename scalar_t, typename acc_t>
inline void gather_block(const scalar_t* value_head, const Tap<acc_t>* taps, int num_taps,
                         int64_t d0, scalar_t* out) {
  if constexpr (kVectors == 0) {
    acc_t acc = 0;
    for (int t = 0; t < num_taps; ++t) {
      acc += taps[t].weight * static_cast<acc_t>(value_head[taps[t].offset + d0]);
    }
    out[d0] = static_cast<scalar_t>(acc);
  } else {
    lanes_t<acc_t> acc[kVectors] = {};
    for (int t = 0; t < num_taps; ++t) {
      const scalar_t* v = value_head + taps[t].offset + d0;
      const acc_t w = taps[t].weight;
      for (int b = 0; b < kVectors; ++b) acc[b] += w * load_lanes<acc_t>(v + b * kLanes);
    }
    for (int b = 0; b < kVectors; ++b) {
      for (int i = 0; i < kLanes; ++i) out[d0 + b * kLanes + i] = static_cast<scalar_t>(acc[b][i]);
    }
  }
}

template <typename scalar_t, typename coord_t>
void forward_kernel(const Sizes& s, const scalar_t* value, const int64_t* spatial_shapes,
                    const int64_t* level_start_index, const coord_t* sampling_locations,
                    const coord_t* attention_weights, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_stride = s.M * s.D;  // between consecutive rows of one head in value
  // Queries are independent and each writes only its own output row, so they split freely.
  at::parallel_for(0, s.N * s.Lq, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    std::vector<Tap<acc_t>> taps(s.L * s.P * 4);
    BilinearCorners<acc_t> corners;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / s.Lq;
      for (int64_t m = 0; m < s.M; ++m) {
        // Resolve every point first: the gathers then do not wait on this arithmetic, and the
        // corner math is shared by all channel blocks.
        int num_taps = 0;
        const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
        const int64_t point0 = (nq * s.M + m) * s.L * s.P;  // into [N, Lq, M, L, P]
        for (int64_t l = 0; l < s.L; ++l) {
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t point = point0 + l * s.P + p;
            resolve_corners<acc_t>(sampling_locations[2 * point], sampling_locations[2 * point + 1],
                                   spatial_shapes[2 * l], spatial_shapes[2 * l + 1],
                                   level_start_index[l], row_stride, corners);
            const acc_t attention = static_cast<acc_t>(attention_weights[point]);
            for (int c = 0; c < corners.count; ++c) {
              taps[num_taps++] = {corners.offset[c], attention * corners.weight[c]};
              prefetch_row(value_head + corners.offset[c], s.D);
            }
          }
        }
        scalar_t* out = output + (nq * s.M + m) * s.D;
        for_each_channel_block(s.D, [&](auto block, int64_t d0) {
          gather_block<decltype(block)::value>(value_head, taps.data(), num_taps, d0, out);
        });
      }
    }
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
