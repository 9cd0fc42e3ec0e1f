// The forward computation of multi-scale deformable attention on the CPU, for one run of
// queries, with no dependency on a framework: the PyTorch extension (ms_deform_attn_cpu.cpp), the
// ONNX Runtime operator (onnxruntime_ops.cpp) and the OpenVINO extension (openvino_ops.cpp) all
// call forward_queries, each from its own thread pool.
//
// Layouts (all contiguous):
//   value               [N, S, M, D]        S = sum_l H_l * W_l, levels flattened row-major
//   spatial_shapes      [L, 2] int64        (H, W) per level
//   level_start_index   [L]    int64        first row of each level in S
//   sampling_locations  [N, Lq, M, L, P, 2] normalised (x, y)
//   attention_weights   [N, Lq, M, L, P]
//   output              [N, Lq, M * D]
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): pixel
// centre i lies at (i + 0.5) / size, and a bilinear corner that falls off the map reads zero.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace detrkit::deform {

// Whether T is a bfloat16 type, widened to fp32 by a shift in load_lanes; a framework that has
// one specialises this for it.
template <typename T>
struct is_bfloat16 : std::false_type {};

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};


// What is wrong with the levels' (H, W) and first rows for value's S positions, or nullptr: each
// size positive, their areas summing to S, each start the sum of the areas before it. The
// running sum is bounded by S before any multiplication, so sizes near int64's limits cannot
// wrap around to pass (every front end runs this before the kernel reads value).
inline const char* check_levels(const int64_t* spatial_shapes, const int64_t* level_start_index,
                                int64_t L, int64_t S) {
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t height = spatial_shapes[2 * l], width = spatial_shapes[2 * l + 1];
    if (height <= 0 || width <= 0) return "spatial_shapes must be positive";
    if (height > (S - total) / width) {
      return "value's S must equal the sum of H * W over spatial_shapes";
    }
    if (level_start_index[l] != total) {
      return "level_start_index must be the exclusive cumsum of H * W";
    }
    total += height * width;
  }
  return total == S ? nullptr : "value's S must equal the sum of H * W over spatial_shapes";
}

// What is wrong with the inputs' shapes (each as its list of sizes) and level values, or
// nullptr; fills s from them. Every front end (PyTorch, ONNX Runtime, OpenVINO) runs it before
// the kernel, so that its pointer arithmetic stays in bounds whatever it is fed; hw and start are read only once spatial_shapes and level_start_index are
// known to hold L rows.
inline const char* check_inputs(const std::vector<int64_t>& value,
                                const std::vector<int64_t>& shapes,
                                const std::vector<int64_t>& starts,
                                const std::vector<int64_t>& locations,
                                const std::vector<int64_t>& weights, const int64_t* hw,
                                const int64_t* start, Sizes& s) {
  if (value.size() != 4) return "value must be [N, S, M, D]";
  if (locations.size() != 6 || locations[5] != 2) {
    return "sampling_locations must be [N, Lq, M, L, P, 2]";
  }
  s = Sizes{value[0], value[1], value[2], value[3], locations[1], locations[3], locations[4]};
  if (locations[0] != s.N || locations[2] != s.M) {
    return "sampling_locations does not match value's N and M";
  }
  if (weights != std::vector<int64_t>(locations.begin(), locations.end() - 1)) {
    return "attention_weights must be [N, Lq, M, L, P], as sampling_locations[..., 0]";
  }
  if (shapes.size() != 2 || shapes[0] != s.L || shapes[1] != 2) {
    return "spatial_shapes must be [L, 2]";
  }
  if (starts.size() != 1 || starts[0] != s.L) return "level_start_index must be [L]";
  return check_levels(hw, start, s.L, s.S);
}

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
    // An infinite location lands here too and reads nothing (grid_sample's arithmetic turns
    // it into NaN); only a finite model's locations are meant to be sampled.
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
  } else if constexpr (is_bfloat16<scalar_t>::value && std::is_same_v<acc_t, float>) {
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

// Computes output rows [begin, end) of the flattened (n, query) axis, each row M * D values.
// Queries are independent and each writes only its own row, so callers split them freely.
template <typename scalar_t, typename coord_t, typename acc_t>
void forward_queries(const Sizes& s, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const coord_t* sampling_locations,
                     const coord_t* attention_weights, scalar_t* output, int64_t begin,
                     int64_t end) {
  const int64_t row_stride = s.M * s.D;  // between consecutive rows of one head in value
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
}

}  // namespace detrkit::deform
