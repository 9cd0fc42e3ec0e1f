// Dropout for CPU with a counter-based random stream.
//
// torch's CPU dropout draws its mask from a sequential Mersenne Twister, about 7 ns per element on
// a 2-core machine, which made mask drawing the largest single cost of a Deformable DETR training
// step. Here the keep decision of element i of the (contiguous) input is a pure function of
// (seed, i): 32 bits of SplitMix64's output for counter i / 2, kept when they are at least
// round(p * 2^32). That gives
//   * speed: a few integer multiplies per pair of elements, in parallel;
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

namespace {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;  // SplitMix64's counter increment

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

// Calls fn(i, factor) for every element i < numel, with factor = 1 / (1 - p) where the element is
// kept and 0 where it is dropped, in parallel over pairs of elements.
template <typename acc_t, typename Fn>
void for_each_keep_factor(int64_t numel, KeepRule rule, double p, const Fn& fn) {
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  auto factor = [&](uint32_t bits) { return bits >= rule.threshold ? scale : acc_t(0); };
  const int64_t num_pairs = (numel + 1) / 2;
  at::parallel_for(0, num_pairs, /*grain_size=*/8192, [&](int64_t begin, int64_t end) {
    const int64_t full_end = std::min(end, numel / 2);  // pairs with both elements present
    for (int64_t pair = begin; pair < full_end; ++pair) {
      const uint64_t bits = rule.bits(pair);
      fn(2 * pair, factor(static_cast<uint32_t>(bits)));
      fn(2 * pair + 1, factor(static_cast<uint32_t>(bits >> 32)));
    }
    if (end > full_end && full_end >= begin) {  // odd numel: the last pair has one element
      fn(numel - 1, factor(static_cast<uint32_t>(rule.bits(numel / 2))));
    }
  });
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
        const scalar_t* x = input_c.const_data_ptr<scalar_t>();
        scalar_t* y = out.mutable_data_ptr<scalar_t>();
        for_each_keep_factor<acc_t>(input_c.numel(), rule, p, [&](int64_t i, acc_t factor) {
          acc_t value = static_cast<acc_t>(x[i]);
          if constexpr (kRelu) value = std::max(value, acc_t(0));
          y[i] = static_cast<scalar_t>(value * factor);
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
