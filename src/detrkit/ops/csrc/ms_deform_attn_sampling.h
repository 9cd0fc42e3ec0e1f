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

#include "vector_lanes.h"

namespace detrkit::deform {

using simd::kLanes;
using simd::lanes_t;
using simd::load_lanes;
using simd::store_lanes;
using simd::store_narrow;
using simd::sum_lanes;

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

// Splits D channels into blocks of kVectors * kLanes with a compile-time size, so that a block's
// accumulators stay in registers across all taps: 4 vectors, then 2 (32 channels, Deformable
// DETR's D), then single vectors, then a scalar tail (kVectors = 0, one channel).
template <typename Fn>
inline void for_each_channel_block(int64_t D, Fn&& fn) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) fn(std::integral_constant<int, 4>{}, d0);
  for (; d0 + 2 * kLanes <= D; d0 += 2 * kLanes) fn(std::integral_constant<int, 2>{}, d0);
  for (; d0 + kLanes <= D; d0 += kLanes) fn(std::integral_constant<int, 1>{}, d0);
  for (; d0 < D; ++d0) fn(std::integral_constant<int, 0>{}, d0);
}

// The points of one query and head are resolved kPointLanes at a time, as vectors (one AVX-512
// register of fp32 for Deformable DETR's L * P = 16): resolving them one by one, with a branch per
// corner, took most of the forward's time.
constexpr int kPointLanes = 16;

template <typename acc_t>
struct PointVectors {
  // Integer lanes as wide as acc_t's, so that comparisons of acc_t vectors give index masks.
  using index_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef acc_t real __attribute__((vector_size(kPointLanes * sizeof(acc_t))));
  typedef index_t index __attribute__((vector_size(kPointLanes * sizeof(index_t))));
  typedef int64_t wide __attribute__((vector_size(kPointLanes * sizeof(int64_t))));
  typedef uint64_t address __attribute__((vector_size(kPointLanes * sizeof(uint64_t))));
};

template <typename V>
inline V load_vector(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Each point's level, spread over the points of one query and head ([L * P] rounded up to whole
// vectors): its map's width, height and first row. Padding points lie on a 1x1 map.
template <typename acc_t>
struct PointLevels {
  using index_t = typename PointVectors<acc_t>::index_t;
  std::vector<index_t> width_i, height_i, start;
  // Whether every offset into value fits index_t (always, for fp64's int64 lanes).
  bool fits;

  PointLevels(const Sizes& s, const int64_t* spatial_shapes, const int64_t* level_start_index,
              int64_t padded)
      : width_i(padded, 1), height_i(padded, 1), start(padded, 0) {
    // Offsets are also computed for corners off the map, from (-2, -2) to (W, H) of a level:
    // between -(2 W + 2) and S + W rows.
    int64_t widest = 1;
    for (int64_t l = 0; l < s.L; ++l) widest = std::max(widest, spatial_shapes[2 * l + 1]);
    const int64_t rows = s.S + 2 * widest + 4;
    fits = rows <= std::numeric_limits<index_t>::max() / std::max<int64_t>(s.M * s.D, 1);
    for (int64_t i = 0; i < s.L * s.P && fits; ++i) {
      const int64_t l = i / s.P;
      width_i[i] = static_cast<index_t>(spatial_shapes[2 * l + 1]);
      height_i[i] = static_cast<index_t>(spatial_shapes[2 * l]);
      start[i] = static_cast<index_t>(level_start_index[l]);
    }
  }
};

// The taps of one query and head: every point's four bilinear corners, as the value row each
// reads and its weight (attention x bilinear), laid out [chunk of kPointLanes points][corner]
// [lane]. A corner off the map reads a row of zeros with weight 0, so that no tap needs a branch;
// a NaN location's or NaN weight's first corner has weight NaN, which poisons the output as
// grid_sample does.
template <typename scalar_t, typename acc_t>
struct Taps {
  std::vector<const scalar_t*> row;
  std::vector<acc_t> weight;
  std::vector<scalar_t> zeros;

  Taps(int64_t padded, int64_t channels)
      : row(padded * 4), weight(padded * 4), zeros(channels, scalar_t(0)) {}

  // Corners by resolve_corners, point by point: for maps whose offsets do not fit the vector
  // path's integer lanes.
  void resolve_one_by_one(const Sizes& s, const int64_t* spatial_shapes,
                          const int64_t* level_start_index, const scalar_t* value_head,
                          const acc_t* x, const acc_t* y, const acc_t* attention) {
    std::fill(row.begin(), row.end(), zeros.data());
    std::fill(weight.begin(), weight.end(), acc_t(0));
    BilinearCorners<acc_t> corners;
    for (int64_t i = 0; i < s.L * s.P; ++i) {
      const int64_t l = i / s.P;
      resolve_corners<acc_t>(x[i], y[i], spatial_shapes[2 * l], spatial_shapes[2 * l + 1],
                             level_start_index[l], s.M * s.D, corners);
      const int64_t t0 = (i - i % kPointLanes) * 4 + i % kPointLanes;  // the first corner's
      for (int c = 0; c < corners.count; ++c) {
        row[t0 + c * kPointLanes] = value_head + corners.offset[c];
        weight[t0 + c * kPointLanes] = attention[i] * corners.weight[c];
      }
      if (corners.count == 0 && std::isnan(attention[i])) weight[t0] = attention[i];
    }
  }

  // The same taps, kPointLanes points at a time, with resolve_corners' arithmetic.
  void resolve(const PointLevels<acc_t>& levels, const scalar_t* value_head, const acc_t* x,
               const acc_t* y, const acc_t* attention, int64_t padded, int64_t row_stride) {
    using V = typename PointVectors<acc_t>::real;
    using I = typename PointVectors<acc_t>::index;
    using W = typename PointVectors<acc_t>::wide;
    using A = typename PointVectors<acc_t>::address;
    using index_t = typename PointVectors<acc_t>::index_t;
    const A base = A{} + reinterpret_cast<uint64_t>(value_head);
    const A nowhere = A{} + reinterpret_cast<uint64_t>(zeros.data());
    for (int64_t p0 = 0; p0 < padded; p0 += kPointLanes) {
      const I width_i = load_vector<I>(&levels.width_i[p0]);
      const I height_i = load_vector<I>(&levels.height_i[p0]);
      const V width = __builtin_convertvector(width_i, V);
      const V height = __builtin_convertvector(height_i, V);
      const I start = load_vector<I>(&levels.start[p0]);
      const V attention_p = load_vector<V>(attention + p0);
      V px = load_vector<V>(x + p0) * width - acc_t(0.5);
      V py = load_vector<V>(y + p0) * height - acc_t(0.5);
      // A NaN weight poisons too, even for a point off the map, as grid_sample's zero times
      // NaN does.
      const I nan = (px != px) | (py != py) | (attention_p != attention_p);
      // As resolve_corners: past these bounds every corner is off the map. Such points (and
      // NaN ones) move to (-2, -2), whose corners are all off too, which keeps the integer
      // arithmetic in range.
      const I in_range = (px >= acc_t(-1)) & (py >= acc_t(-1)) & (px < width) & (py < height);
      px = in_range ? px : V{} - acc_t(2);
      py = in_range ? py : V{} - acc_t(2);
      // floor(), from truncation of a number that is now at least -1 (+1 makes it >= 0), then
      // one down where rounding in the +1 went up.
      I x0 = __builtin_convertvector(px + acc_t(1), I) - index_t(1);
      I y0 = __builtin_convertvector(py + acc_t(1), I) - index_t(1);
      x0 += __builtin_convertvector(x0, V) > px;  // a true mask is -1
      y0 += __builtin_convertvector(y0, V) > py;
      const V fx = px - __builtin_convertvector(x0, V);
      const V fy = py - __builtin_convertvector(y0, V);
      const V gx = acc_t(1) - fx;
      const V gy = acc_t(1) - fy;
      for (int c = 0; c < 4; ++c) {  // (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
        const I cx = x0 + index_t(c & 1);
        const I cy = y0 + index_t(c >> 1);
        const I inside = (cx >= 0) & (cy >= 0) & (cx < width_i) & (cy < height_i);
        const I offset = (start + cy * width_i + cx) * static_cast<index_t>(row_stride);
        A address = base + __builtin_convertvector(offset, A) * sizeof(scalar_t);
        address = __builtin_convertvector(inside, W) ? address : nowhere;
        V tap_weight = attention_p * (((c & 1) ? fx : gx) * ((c >> 1) ? fy : gy));
        tap_weight = inside ? tap_weight : V{};
        if (c == 0) tap_weight = nan ? V{} + std::numeric_limits<acc_t>::quiet_NaN() : tap_weight;
        const int64_t t = p0 * 4 + c * kPointLanes;
        std::memcpy(&row[t], &address, sizeof(address));
        std::memcpy(&weight[t], &tap_weight, sizeof(tap_weight));
      }
    }
  }
};

// out[d0 : d0 + block] = sum over taps of weight * row[d0 : d0 + block], point by point.
template <int kVectors, typename scalar_t, typename acc_t>
inline void gather_block(const Taps<scalar_t, acc_t>& taps, int64_t padded, int64_t d0,
                         scalar_t* out) {
  const scalar_t* const* rows = taps.row.data();
  const acc_t* weights = taps.weight.data();
  if constexpr (kVectors == 0) {
    acc_t acc = 0;
    for (int64_t p0 = 0; p0 < padded; p0 += kPointLanes) {
      for (int i = 0; i < kPointLanes; ++i) {
        for (int c = 0; c < 4; ++c) {
          const int64_t t = p0 * 4 + c * kPointLanes + i;
          acc += weights[t] * static_cast<acc_t>(rows[t][d0]);
        }
      }
    }
    out[d0] = static_cast<scalar_t>(acc);
  } else {
    // Two sets of accumulators, for a point's left and right corners: one set alone makes
    // every tap wait for the previous one's multiply-add.
    lanes_t<acc_t> left[kVectors] = {}, right[kVectors] = {};
    for (int64_t p0 = 0; p0 < padded; p0 += kPointLanes) {
      for (int i = 0; i < kPointLanes; ++i) {
        for (int c = 0; c < 4; c += 2) {
          const int64_t t = p0 * 4 + c * kPointLanes + i;
          const scalar_t* v = rows[t] + d0;
          const scalar_t* u = rows[t + kPointLanes] + d0;
          const acc_t w = weights[t], x = weights[t + kPointLanes];
          for (int b = 0; b < kVectors; ++b) {
            left[b] += w * load_lanes<acc_t>(v + b * kLanes);
            right[b] += x * load_lanes<acc_t>(u + b * kLanes);
          }
        }
      }
    }
    for (int b = 0; b < kVectors; ++b) {
      store_narrow<acc_t>(out + d0 + b * kLanes, left[b] + right[b]);
    }
  }
}

// Computes output rows [begin, end) of the flattened (n, query) axis, each row M * D values.
// Queries are independent and each writes only its own row, so callers split them freely.
// locate(nq, padded, x, y, attention) writes the L * P points of each head m of query nq from
// m * padded on: normalised locations and attention weights, in the order (level, point).
template <typename scalar_t, typename acc_t, typename Locate>
void forward_queries_located(const Sizes& s, const scalar_t* value, const int64_t* spatial_shapes,
                             const int64_t* level_start_index, const Locate& locate,
                             scalar_t* output, int64_t begin, int64_t end) {
  const int64_t row_stride = s.M * s.D;  // between consecutive rows of one head in value
  const int64_t points = s.L * s.P;
  const int64_t padded = (points + kPointLanes - 1) / kPointLanes * kPointLanes;
  const PointLevels<acc_t> levels(s, spatial_shapes, level_start_index, padded);
  // Padding points: off every map, weightless.
  std::vector<acc_t> x(s.M * padded, acc_t(-2)), y(s.M * padded, acc_t(-2));
  std::vector<acc_t> attention(s.M * padded, acc_t(0));
  Taps<scalar_t, acc_t> taps(padded, s.D);
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / s.Lq;
    locate(nq, padded, x.data(), y.data(), attention.data());
    for (int64_t m = 0; m < s.M; ++m) {
      const acc_t* head_x = x.data() + m * padded;
      const acc_t* head_y = y.data() + m * padded;
      const acc_t* head_attention = attention.data() + m * padded;
      const scalar_t* value_head = value + n * s.S * row_stride + m * s.D;
      // Resolve every point first: the gathers then do not wait on this arithmetic, and the
      // corner math is shared by all channel blocks. (Prefetching the taps' rows first, as the
      // backward pass does, made this loop slower: its rows are mostly in cache already.)
      if (levels.fits) {
        taps.resolve(levels, value_head, head_x, head_y, head_attention, padded, row_stride);
      } else {
        taps.resolve_one_by_one(s, spatial_shapes, level_start_index, value_head, head_x, head_y,
                                head_attention);
      }
      scalar_t* out = output + (nq * s.M + m) * s.D;
      for_each_channel_block(s.D, [&](auto block, int64_t d0) {
        gather_block<decltype(block)::value>(taps, padded, d0, out);
      });
    }
  }
}

// exp(x) for 16 fp32 lanes at once, to within a few units in the last place (Cephes' expf:
// x = n ln 2 + r, exp(r) by a polynomial); 0 below fp32's smallest normal result. Inputs must not
// be NaN or +inf (softmax_points checks).
inline PointVectors<float>::real exp_lanes(PointVectors<float>::real x) {
  using V = PointVectors<float>::real;
  using I = PointVectors<float>::index;
  const I underflow = x < -87.33654f;
  x = underflow ? V{} - 87.33654f : x;
  x = x > 88.37626f ? V{} + 88.37626f : x;
  const V scaled = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(scaled, I);
  n += __builtin_convertvector(n, V) > scaled;  // truncation to floor(); a true mask is -1
  const V nf = __builtin_convertvector(n, V);
  x = x - nf * 0.693359375f;
  x = x - nf * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const I bits = (n + 127) << 23;  // 2^n
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? V{} : y * scale;
}

// softmax over x[0 : count] in place, as torch's softmax: exp(x - max), then times 1 / sum.
// Vectorised for fp32 when count is whole vectors and every logit is finite; otherwise with
// std::exp, which gives NaN for a NaN or infinite logit as torch does.
template <typename acc_t>
inline void softmax_points(acc_t* x, int64_t count) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = PointVectors<float>::real;
    using I = PointVectors<float>::index;
    if (count % kPointLanes == 0 && count > 0) {
      V top = load_vector<V>(x);
      I bad = {};
      for (int64_t i0 = 0; i0 < count; i0 += kPointLanes) {
        const V logit = load_vector<V>(x + i0);
        top = logit > top ? logit : top;
        bad |= (logit - logit) != 0.0f;  // NaN for an infinity or a NaN
      }
      bool finite = true;
      for (int i = 0; i < kPointLanes; ++i) finite = finite && !bad[i];
      if (finite) {
        const float max = simd::reduce_lanes<float, true>(top);
        V total = {};
        for (int64_t i0 = 0; i0 < count; i0 += kPointLanes) {
          const V e = exp_lanes(load_vector<V>(x + i0) - max);
          total += e;
          std::memcpy(x + i0, &e, sizeof(e));
        }
        const float inverse = 1.0f / sum_lanes<float>(total);
        for (int64_t i0 = 0; i0 < count; i0 += kPointLanes) {
          const V w = load_vector<V>(x + i0) * inverse;
          std::memcpy(x + i0, &w, sizeof(w));
        }
        return;
      }
    }
  }
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < count; ++i) max = std::max(max, x[i]);
  acc_t sum = 0;
  for (int64_t i = 0; i < count; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const acc_t inverse = acc_t(1) / sum;
  for (int64_t i = 0; i < count; ++i) x[i] *= inverse;
}

// The x (kOdd false) or the y (kOdd true) of the 16 (x, y) pairs that a and b hold in turn.
template <bool kOdd, typename V>
inline V deinterleave(V a, V b) {
  static_assert(kPointLanes == 16);
#if defined(__clang__)  // constant indices only
  if constexpr (kOdd) {
    return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  } else {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  }
#else
  using I = typename PointVectors<std::remove_reference_t<decltype(a[0])>>::index;
  const I even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  return __builtin_shuffle(a, b, even + static_cast<int>(kOdd));
#endif
}

// The points of query nq computed, as Deformable DETR's attention does, from the query's own
// linear projection and its reference points:
//   projection          [N * Lq, M * L * P * 3]: offsets [M, L, P, 2], then logits [M, L * P]
//   reference_points    [N * Lq, L, 2] normalised (x, y)
//   attention           = softmax(logits of head m) over its L * P points
//   location (l, p)     = reference_points[l] + offset(l, p) / (W_l, H_l)
// All arithmetic in acc_t (fp32 for bf16 projections), as the reference's fp32 locations.
template <typename scalar_t, typename acc_t>
struct ProjectedPoints {
  // The vector path's limit on L * P: the reference coordinates of one query's points are kept
  // in registers, kMaxVectorPoints * 2 / kPointLanes vectors.
  static constexpr int64_t kMaxVectorPoints = 64;

  const Sizes& s;
  const scalar_t* projection;
  const acc_t* reference_points;
  // Over the interleaved (x, y) of a head's points: the index of each one's reference
  // coordinate in a query's [L, 2] reference points, and its level's width or height.
  std::vector<int64_t> reference_of;
  std::vector<acc_t> normalizer;

  ProjectedPoints(const Sizes& sizes, const scalar_t* projection, const acc_t* reference_points,
                  const int64_t* spatial_shapes)
      : s(sizes), projection(projection), reference_points(reference_points),
        reference_of(2 * sizes.L * sizes.P), normalizer(2 * sizes.L * sizes.P) {
    for (int64_t j = 0; j < 2 * s.L * s.P; ++j) {
      const int64_t l = j / (2 * s.P), axis = j % 2;  // axis 0: x by the width, 1: y by the height
      reference_of[j] = 2 * l + axis;
      normalizer[j] = static_cast<acc_t>(spatial_shapes[2 * l + 1 - axis]);
    }
  }

  // x, y and attention hold M heads' points, head m's from m * padded.
  void operator()(int64_t nq, int64_t padded, acc_t* x, acc_t* y, acc_t* attention) const {
    const int64_t points = s.L * s.P;
    const scalar_t* row = projection + nq * s.M * points * 3;
    const scalar_t* logits = row + s.M * points * 2;  // [M, L * P]
    const acc_t* reference = reference_points + nq * s.L * 2;
    if constexpr (std::is_same_v<acc_t, float> && kLanes == kPointLanes) {
      if (points % kPointLanes == 0 && points <= kMaxVectorPoints) {
        using V = PointVectors<float>::real;
        V origin[2 * kMaxVectorPoints / kPointLanes];  // reference coordinates, as the offsets
        for (int64_t j = 0; j < 2 * points; ++j) {
          origin[j / kPointLanes][j % kPointLanes] = reference[reference_of[j]];
        }
        for (int64_t m = 0; m < s.M; ++m) {
          const scalar_t* offsets = row + m * points * 2;  // [L, P, 2]
          for (int64_t i0 = 0; i0 < points; i0 += kPointLanes) {
            const V logit = load_lanes<float>(logits + m * points + i0);
            std::memcpy(attention + m * padded + i0, &logit, sizeof(logit));
            const int64_t k = 2 * i0 / kPointLanes;  // the two vectors of these points' (x, y)
            const V first = origin[k] + load_lanes<float>(offsets + 2 * i0) /
                                            load_vector<V>(&normalizer[2 * i0]);
            const V second =
                origin[k + 1] + load_lanes<float>(offsets + 2 * i0 + kPointLanes) /
                                    load_vector<V>(&normalizer[2 * i0 + kPointLanes]);
            const V xs = deinterleave<false>(first, second);
            const V ys = deinterleave<true>(first, second);
            std::memcpy(x + m * padded + i0, &xs, sizeof(xs));
            std::memcpy(y + m * padded + i0, &ys, sizeof(ys));
          }
          softmax_points<float>(attention + m * padded, points);
        }
        return;
      }
    }
    for (int64_t m = 0; m < s.M; ++m) {
      const scalar_t* offsets = row + m * points * 2;
      acc_t* head_x = x + m * padded;
      acc_t* head_y = y + m * padded;
      acc_t* head_attention = attention + m * padded;
      for (int64_t i = 0; i < points; ++i) {
        head_attention[i] = static_cast<acc_t>(logits[m * points + i]);
        head_x[i] =
            reference[reference_of[2 * i]] + static_cast<acc_t>(offsets[2 * i]) / normalizer[2 * i];
        head_y[i] = reference[reference_of[2 * i + 1]] +
                    static_cast<acc_t>(offsets[2 * i + 1]) / normalizer[2 * i + 1];
      }
      softmax_points<acc_t>(head_attention, points);
    }
  }
};

// The points as given: sampling_locations [N, Lq, M, L, P, 2] and attention_weights
// [N, Lq, M, L, P].
template <typename coord_t, typename acc_t>
struct GivenPoints {
  const Sizes& s;
  const coord_t* sampling_locations;
  const coord_t* attention_weights;

  // x, y and attention hold M heads' points, head m's from m * padded.
  void operator()(int64_t nq, int64_t padded, acc_t* x, acc_t* y, acc_t* attention) const {
    const int64_t points = s.L * s.P;
    for (int64_t m = 0; m < s.M; ++m) {
      const int64_t point0 = (nq * s.M + m) * points;
      for (int64_t i = 0; i < points; ++i) {
        x[m * padded + i] = static_cast<acc_t>(sampling_locations[2 * (point0 + i)]);
        y[m * padded + i] = static_cast<acc_t>(sampling_locations[2 * (point0 + i) + 1]);
        attention[m * padded + i] = static_cast<acc_t>(attention_weights[point0 + i]);
      }
    }
  }
};

// forward_queries_located with GivenPoints.
template <typename scalar_t, typename coord_t, typename acc_t>
void forward_queries(const Sizes& s, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const coord_t* sampling_locations,
                     const coord_t* attention_weights, scalar_t* output, int64_t begin,
                     int64_t end) {
  const GivenPoints<coord_t, acc_t> locate{s, sampling_locations, attention_weights};
  forward_queries_located<scalar_t, acc_t>(s, value, spatial_shapes, level_start_index, locate,
                                           output, begin, end);
}

}  // namespace detrkit::deform
