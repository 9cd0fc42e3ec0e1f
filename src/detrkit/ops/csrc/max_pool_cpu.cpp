// Max pooling over channels-last memory, for inference on the CPU (the ResNet stem's 3x3, stride
// 2, padding 1 pool on 64 channels).
//
// PyTorch's CPU max pooling also writes the index of every maximum (an int64 per output value,
// for its backward): for the stem of an 800x1066 image that is 56 MB written beside a 7 MB
// output. This kernel writes the output only, 16 channels per vector where the channels fill
// vectors (fp32 and bf16). The result is PyTorch's: the maximum over the window's in-map pixels
// (padding never wins), NaN where the window holds one.

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DETRKIT_MAX_POOL_VECTORS 1
#include <immintrin.h>
#endif

namespace {

#ifdef DETRKIT_MAX_POOL_VECTORS
// 16 channels as fp32 lanes, and back. bf16 widens exactly and the maximum is one of its inputs,
// so narrowing it back by truncation is exact (NaN included).
inline __m512 load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_lanes(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store_lanes(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_lanes(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}

// One output pixel's channels, 16 at a time, over the window's in-map pixels [h_begin, h_end) x
// [w_begin, w_end) of the row of pixels at `image`.
template <typename scalar_t>
void max_pool_pixel_lanes(const scalar_t* image, scalar_t* out, int64_t W, int64_t C,
                          int64_t h_begin, int64_t h_end, int64_t w_begin, int64_t w_end) {
  for (int64_t c = 0; c < C; c += 16) {
    __m512 maxima = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t h = h_begin; h < h_end; ++h) {
      for (int64_t w = w_begin; w < w_end; ++w) {
        const __m512 value = load_lanes(image + (h * W + w) * C + c);
        // As PyTorch's kernel: a larger value or a NaN wins, and a NaN stays.
        const __mmask16 wins = _mm512_cmp_ps_mask(value, maxima, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
        maxima = _mm512_mask_mov_ps(maxima, wins, value);
      }
    }
    store_lanes(out + c, maxima);
  }
}
#endif

template <typename scalar_t>
void max_pool_kernel(const scalar_t* input, scalar_t* output, int64_t N, int64_t H, int64_t W,
                     int64_t C, int64_t out_h, int64_t out_w, int64_t kernel_h, int64_t kernel_w,
                     int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  // Output rows are independent: each thread takes whole rows.
  at::parallel_for(0, N * out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> maxima(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h;
      const int64_t oh = row % out_h;
      const int64_t h0 = oh * stride_h - pad_h;
      const int64_t h_begin = std::max<int64_t>(h0, 0);
      const int64_t h_end = std::min(h0 + kernel_h, H);
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const int64_t w0 = ow * stride_w - pad_w;
        const int64_t w_begin = std::max<int64_t>(w0, 0);
        const int64_t w_end = std::min(w0 + kernel_w, W);
#ifdef DETRKIT_MAX_POOL_VECTORS
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
          if (C % 16 == 0) {
            scalar_t* out = output + ((n * out_h + oh) * out_w + ow) * C;
            max_pool_pixel_lanes(input + n * H * W * C, out, W, C, h_begin, h_end, w_begin,
                                 w_end);
            continue;
          }
        }
#endif
        std::fill(maxima.begin(), maxima.end(), -std::numeric_limits<acc_t>::infinity());
        for (int64_t h = h_begin; h < h_end; ++h) {
          for (int64_t w = w_begin; w < w_end; ++w) {
            const scalar_t* pixel = input + ((n * H + h) * W + w) * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t value = static_cast<acc_t>(pixel[c]);
              // As PyTorch's kernel: a NaN wins and stays.
              maxima[c] = (value > maxima[c] || std::isnan(value)) ? value : maxima[c];
            }
          }
        }
        scalar_t* out = output + ((n * out_h + oh) * out_w + ow) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(maxima[c]);
      }
    }
  });
}

}  // namespace

namespace detrkit {

at::Tensor max_pool2d_channels_last(const at::Tensor& input, int64_t kernel_h, int64_t kernel_w,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                    int64_t pad_w) {
  TORCH_CHECK(input.device().is_cpu() && input.dim() == 4 &&
                  input.is_contiguous(at::MemoryFormat::ChannelsLast),
              "max_pool2d_channels_last: input must be a channels-last [N, C, H, W] CPU tensor");
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0 && stride_h > 0 && stride_w > 0 && pad_h >= 0 &&
                  pad_w >= 0 && 2 * pad_h <= kernel_h && 2 * pad_w <= kernel_w,
              "max_pool2d_channels_last: positive kernel and stride, padding at most half the "
              "kernel");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  // floor mode, as nn.MaxPool2d's default ceil_mode=False
  const int64_t out_h = (H + 2 * pad_h - kernel_h) / stride_h + 1;
  const int64_t out_w = (W + 2 * pad_w - kernel_w) / stride_w + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, "max_pool2d_channels_last: input smaller than the kernel");
  at::Tensor output = at::empty({N, C, out_h, out_w},
                                input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "max_pool2d_channels_last", [&] {
        max_pool_kernel<scalar_t>(input.const_data_ptr<scalar_t>(),
                                  output.mutable_data_ptr<scalar_t>(), N, H, W, C, out_h, out_w,
                                  kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w);
      });
  return output;
}

}  // namespace detrkit
