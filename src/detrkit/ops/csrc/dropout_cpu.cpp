// Dropout for CPU with a counter-based random stream.
//
// torch's CPU dropout draws its mask from a sequential Mersenne Twister, about 7 ns per element on
// a 2-core machine, which made mask drawing the largest single cost of a Deformable DETR training
// step. Here the keep decision of element i of the (contiguous) input is a pure function of
// (seed, i): 32 bits of SplitMix64's output for counter i / 2, kept when they are at least
// round(p * 2^32). That gives
//   * speed: a few integer multiplies per pair of elements, vectorised and in parallel;
//   * no stored mask: the backward pass applies the same function to the gradient;
//   * the same result for any number of threads.
// Kept elements are scaled by 1 / (1 - p), in at::opmath_type (fp32 for bf16/fp16).
//
// relu_dropout is dropout(relu(x)) in one pass, as in a transformer's MLP: no separate ReLU
// output, and its backward needs only the output (an element passed iff it is above zero).

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;  // SplitMix64's counter increment
// Pairs of elements whose factors are drawn at a time: per thread, stack buffers of 24 KB (fp32
// factors) to 32 KB (fp64), which stay in cache between the passes.
constexpr int64_t kPairsPerChunk = 1024;

// SplitMix64's output function (Steele, Lea and Flood, 2014).
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

struct KeepRule {
  uint64_t seed;
  uint32_t threshold;  // an element is dropped when its 32 random bits are below this

  // The random bits of elements 2k (low half) and 2k + 1 (high half).
  uint64_t bits(int64_t pair) const {
    return mix64(seed + static_cast<uint64_t>(pair + 1) * kGoldenGamma);
  }
};

KeepRule keep_rule(double p, int64_t seed) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout: p must be in (0, 1), got ", p);
  const double threshold = std::round(std::ldexp(p, 32));
  return {static_cast<uint64_t>(seed),
          static_cast<uint32_t>(std::min(threshold, 4294967295.0))};
}

// The keep factors of elements [2 * first_pair, 2 * first_pair + 2 * pairs): 1 / (1 - p) where
// kept, else 0. Two plain loops that the compiler vectorises (AVX-512 has 64-bit multiplies): the
// hashes, whose low and high halves are the 32 bits of elements 2k and 2k + 1 on this
// little-endian layout, then a select between two constants. Hashing element by element inside
// the loop that applies the factors compiled to scalar code, 7x slower than a pass over memory.
template <typename acc_t>
void keep_factors(KeepRule rule, acc_t scale, int64_t first_pair, int64_t pairs, acc_t* factors) {
  static_assert(sizeof(uint64_t) == 2 * sizeof(uint32_t));
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the halves' order assumes it");
  uint64_t hashes[kPairsPerChunk];
  for (int64_t k = 0; k < pairs; ++k) hashes[k] = rule.bits(first_pair + k);
  uint32_t halves[2 * kPairsPerChunk];
  std::memcpy(halves, hashes, sizeof(uint64_t) * pairs);
  for (int64_t i = 0; i < 2 * pairs; ++i) factors[i] = halves[i] >= rule.threshold ? scale : acc_t(0);
}

// out[i] = f(x[i]) * factors[i], with f the identity or ReLU; restrict pointers so that it
// vectorises (the in-place form is its own function, as out aliases x there).
template <bool kRelu, typename scalar_t, typename acc_t>
inline scalar_t apply_factor(scalar_t x, acc_t factor) {
  acc_t value = static_cast<acc_t>(x);
  if constexpr (kRelu) value = std::max(value, acc_t(0));
  return static_cast<scalar_t>(value * factor);
}

template <bool kRelu, typename scalar_t, typename acc_t>
void apply_factors(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                   const acc_t* __restrict__ factors, int64_t size) {
  for (int64_t i = 0; i < size; ++i) out[i] = apply_factor<kRelu>(x[i], factors[i]);
}

template <bool kRelu, typename scalar_t, typename acc_t>
void apply_factors_in_place(scalar_t* __restrict__ x, const acc_t* __restrict__ factors,
                            int64_t size) {
  for (int64_t i = 0; i < size; ++i) x[i] = apply_factor<kRelu>(x[i], factors[i]);
}

// out[i] = f(input[i]) * factor(i), with f the identity or ReLU; out is input itself when
// in_place (which needs a contiguous input), else a new tensor.
template <bool kRelu>
at::Tensor dropout_impl(const at::Tensor& input, double p, int64_t seed, bool in_place = false) {
  TORCH_CHECK(input.device().is_cpu(), "dropout: input must be on the CPU");
  TORCH_CHECK(!in_place || input.is_contiguous(), "dropout: in place needs a contiguous input");
  const KeepRule rule = keep_rule(p, seed);
  const at::Tensor input_c = input.contiguous();
  at::Tensor out = in_place ? input : at::empty_like(input_c, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "detrkit_dropout", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
        const int64_t numel = input_c.numel();
        const scalar_t* x = input_c.const_data_ptr<scalar_t>();
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        const int64_t num_chunks = (numel + 2 * kPairsPerChunk - 1) / (2 * kPairsPerChunk);
        at::parallel_for(0, num_chunks, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
          acc_t factors[2 * kPairsPerChunk];
          for (int64_t chunk = begin; chunk < end; ++chunk) {
            const int64_t first = chunk * 2 * kPairsPerChunk;  // an even element index
            const int64_t size = std::min<int64_t>(2 * kPairsPerChunk, numel - first);
            // An odd numel's last element takes the low half of a pair of its own.
            keep_factors(rule, scale, first / 2, (size + 1) / 2, factors);
            if (in_place) {
              apply_factors_in_place<kRelu>(y + first, factors, size);
            } else {
              apply_factors<kRelu>(x + first, y + first, factors, size);
            }
          }
        });
      });
  return out;
}

// The input gradient where y[i] > 0, g[i] * scale, else 0, written so that the compiler
// vectorises it: a select of loaded values, then the multiply. (Selecting between g[i] * scale and
// 0 compiles to a branch per element, as the multiply may not be speculated; on ReLU's random
// pattern that branch is mispredicted about half the time, 7x slower.) Functions of their own,
// with __restrict__ pointers, because the same loop inside the parallel_for lambda was not
// vectorised.
template <typename scalar_t, typename acc_t>
inline scalar_t relu_dropout_grad(scalar_t g, scalar_t y, acc_t scale) {
  const acc_t kept = static_cast<acc_t>(y) > acc_t(0) ? static_cast<acc_t>(g) : acc_t(0);
  return static_cast<scalar_t>(kept * scale);
}

template <typename scalar_t, typename acc_t>
void relu_dropout_backward_range(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                 scalar_t* __restrict__ out, acc_t scale, int64_t size) {
  for (int64_t i = 0; i < size; ++i) out[i] = relu_dropout_grad(g[i], y[i], scale);
}

template <typename scalar_t, typename acc_t>
void relu_dropout_backward_range_in_place(scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                          acc_t scale, int64_t size) {
  for (int64_t i = 0; i < size; ++i) g[i] = relu_dropout_grad(g[i], y[i], scale);
}

}  // namespace

namespace detrkit {

at::Tensor dropout_apply(const at::Tensor& input, double p, int64_t seed) {
  return dropout_impl<false>(input, p, seed);
}

at::Tensor relu_dropout_apply(const at::Tensor& input, double p, int64_t seed) {
  return dropout_impl<true>(input, p, seed);
}

at::Tensor relu_dropout_in_place(const at::Tensor& input, double p, int64_t seed) {
  return dropout_impl<true>(input, p, seed, /*in_place=*/true);
}

at::Tensor relu_dropout_backward(const at::Tensor& grad_output, const at::Tensor& output,
                                 double p, bool in_place) {
  // An output above zero was kept and positive: its gradient is the scale, all others zero.
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "relu_dropout_backward: grad_output has shape ",
              grad_output.sizes(), " but output has ", output.sizes());
  const at::Tensor grad_c = grad_output.contiguous();
  const at::Tensor output_c = output.contiguous().to(grad_output.scalar_type());
  TORCH_CHECK(!in_place || grad_output.is_contiguous(),
              "relu_dropout_backward: in place needs a contiguous grad_output");
  at::Tensor grad_input =
      in_place ? grad_output : at::empty_like(grad_c, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_c.scalar_type(), "detrkit_relu_dropout_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
        const scalar_t* g = grad_c.const_data_ptr<scalar_t>();
        const scalar_t* y = output_c.const_data_ptr<scalar_t>();
        scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, grad_c.numel(), /*grain_size=*/16384, [&](int64_t begin, int64_t end) {
          if (in_place) {
            relu_dropout_backward_range_in_place<scalar_t, acc_t>(out + begin, y + begin, scale,
                                                                  end - begin);
          } else {
            relu_dropout_backward_range<scalar_t, acc_t>(g + begin, y + begin, out + begin, scale,
                                                         end - begin);
          }
        });
      });
  return grad_input;
}

}  // namespace detrkit
