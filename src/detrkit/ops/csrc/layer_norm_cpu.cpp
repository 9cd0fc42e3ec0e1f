// A residual addition and the LayerNorm after it in one pass over the rows, for CPU inference:
// out = layer_norm(x + residual) over the last axis. Post-norm transformer layers end this way;
// as two operators, the sum is written out and read back, and torch's LayerNorm in bf16 reads
// its input twice.
//
// The sum is rounded to the inputs' dtype before the norm reads it, as torch's addition does
// before its LayerNorm; mean and variance are taken in fp32 (fp64 for fp64) over the rounded sum,
// and the result is rounded once.

#include "kernels.h"
#include "vector_lanes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

using detrkit::simd::kLanes;
using detrkit::simd::lanes_t;
using detrkit::simd::load_lanes;
using detrkit::simd::store_narrow;
using detrkit::simd::sum_lanes;

template <typename scalar_t>
void add_layer_norm_rows(const scalar_t* x, const scalar_t* residual, const scalar_t* weight,
                         const scalar_t* bias, double eps, int64_t C, scalar_t* out,
                         int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = lanes_t<acc_t>;
  std::vector<acc_t> row(C), gamma(C), beta(C);
  for (int64_t c = 0; c < C; ++c) {
    gamma[c] = static_cast<acc_t>(weight[c]);
    beta[c] = static_cast<acc_t>(bias[c]);
  }
  scalar_t rounded[kLanes];
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* a = x + r * C;
    const scalar_t* b = residual + r * C;
    V total = {};
    for (int64_t c = 0; c < C; c += kLanes) {
      // The sum in the inputs' dtype, as torch's addition leaves it.
      store_narrow<acc_t>(rounded, load_lanes<acc_t>(a + c) + load_lanes<acc_t>(b + c));
      const V sum = load_lanes<acc_t>(rounded);
      std::memcpy(&row[c], &sum, sizeof(sum));
      total += sum;
    }
    const acc_t mean = sum_lanes<acc_t>(total) / static_cast<acc_t>(C);
    V squares = {};
    for (int64_t c = 0; c < C; c += kLanes) {
      const V centred = load_lanes<acc_t>(&row[c]) - mean;
      squares += centred * centred;
    }
    const acc_t variance = sum_lanes<acc_t>(squares) / static_cast<acc_t>(C);
    const acc_t rstd = acc_t(1) / std::sqrt(variance + static_cast<acc_t>(eps));
    for (int64_t c = 0; c < C; c += kLanes) {
      const V normed = (load_lanes<acc_t>(&row[c]) - mean) * rstd;
      store_narrow<acc_t>(out + r * C + c,
                          normed * load_lanes<acc_t>(&gamma[c]) + load_lanes<acc_t>(&beta[c]));
    }
  }
}

}  // namespace

namespace detrkit {

void add_layer_norm_out(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                        const at::Tensor& bias, double eps, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes() && x.sizes() == out.sizes(),
              "add_layer_norm: x, residual and out must be [rows, C] of one shape");
  const int64_t rows = x.size(0), C = x.size(1);
  TORCH_CHECK(C % kLanes == 0, "add_layer_norm: C must be a multiple of ", kLanes);
  TORCH_CHECK(weight.numel() == C && bias.numel() == C, "add_layer_norm: weight and bias must be [C]");
  const at::Tensor& target = out;
  for (const at::Tensor* t : {&x, &residual, &weight, &bias, &target}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type() && t->is_contiguous(),
                "add_layer_norm: contiguous CPU tensors of one dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_layer_norm", [&] {
    at::parallel_for(0, rows, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
      add_layer_norm_rows<scalar_t>(x.const_data_ptr<scalar_t>(),
                                    residual.const_data_ptr<scalar_t>(),
                                    weight.const_data_ptr<scalar_t>(),
                                    bias.const_data_ptr<scalar_t>(), eps, C,
                                    out.mutable_data_ptr<scalar_t>(), begin, end);
    });
  });
}

}  // namespace detrkit
