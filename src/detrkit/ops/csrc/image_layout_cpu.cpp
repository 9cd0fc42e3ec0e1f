// A batch of RGB images, fp32 [N, 3, H, W] as they are stored (one plane per channel), into bf16
// channels-last memory ([N, H, W, 3]) in one pass, for the backbone's first convolution in bf16
// inference.
//
// torch's copy that changes dtype and layout at once goes element by element; as two copies
// (dtype, then layout) it reads and writes the image three times, and its transpose of 3-channel
// pixels is the slow half. Here 16 pixels of each plane are read as vectors, rounded to bf16
// (nearest even, as torch's cast, subnormals kept) and interleaved into 48 values with two
// permutes.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define DETRKIT_IMAGE_LAYOUT_KERNEL 1
#include <immintrin.h>
#endif

namespace detrkit {

bool image_layout_kernel_available() {
#ifdef DETRKIT_IMAGE_LAYOUT_KERNEL
  return true;
#else
  return false;
#endif
}

at::Tensor rgb_planes_to_channels_last_bf16(const at::Tensor& images) {
  TORCH_CHECK(image_layout_kernel_available(),
              "rgb_planes_to_channels_last_bf16: no AVX-512 BF16 here");
  TORCH_CHECK(images.dim() == 4 && images.size(1) == 3,
              "rgb_planes_to_channels_last_bf16: images must be [N, 3, H, W]");
  TORCH_CHECK(images.scalar_type() == at::kFloat && images.device().is_cpu() &&
                  images.is_contiguous(),
              "rgb_planes_to_channels_last_bf16: images must be contiguous fp32 on the CPU");
  const int64_t N = images.size(0), H = images.size(2), W = images.size(3);
  auto out = at::empty({N, 3, H, W}, images.options().dtype(at::kBFloat16),
                       at::MemoryFormat::ChannelsLast);
#ifdef DETRKIT_IMAGE_LAYOUT_KERNEL
  // Output value k of 16 pixels is channel k % 3 of pixel k / 3: lane p of the first source for
  // channel 0, 16 + p for channel 1 (the two in one register), 32 + p (the second) for channel 2.
  alignas(64) uint16_t first[32], second[32];
  for (int k = 0; k < 48; ++k) {
    const uint16_t lane = static_cast<uint16_t>(16 * (k % 3) + k / 3);
    (k < 32 ? first[k] : second[k - 32]) = lane;
  }
  const __m512i take_first = _mm512_load_si512(first), take_second = _mm512_load_si512(second);
  // Round to nearest even: add 0x7FFF plus the lowest kept bit, keep the top 16 bits.
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
  const __m512i quiet_nan = _mm512_set1_epi32(0x7FC0);  // torch's bf16 NaN
  const float* in = images.data_ptr<float>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  const int64_t plane = H * W;
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, y = row % H;
      const float* red = in + n * 3 * plane + y * W;
      c10::BFloat16* pixels = o + row * W * 3;
      for (int64_t x = 0; x < W; x += 16) {
        const int64_t count = std::min<int64_t>(16, W - x);
        const __mmask16 present = static_cast<__mmask16>((1u << count) - 1u);
        // Rounded on the bits, as c10::BFloat16 does: the instruction that converts to bf16
        // (vcvtneps2bf16) flushes subnormal inputs to zero, torch's cast keeps them.
        const auto narrow = [&](const float* p) {
          const __m512 v = _mm512_maskz_loadu_ps(present, p + x);
          const __m512i bits = _mm512_castps_si512(v);
          const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
          const __m512i rounded =
              _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(half, odd)), 16);
          const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet_nan));
        };
        const __m512i red_green =
            _mm512_inserti64x4(_mm512_castsi256_si512(narrow(red)), narrow(red + plane), 1);
        const __m512i blue = _mm512_castsi256_si512(narrow(red + 2 * plane));
        const __m512i low = _mm512_permutex2var_epi16(red_green, take_first, blue);
        const __m512i high = _mm512_permutex2var_epi16(red_green, take_second, blue);
        const int64_t values = 3 * count;  // 48 for whole vectors
        const __mmask32 low_mask = values >= 32 ? ~0u : (1u << values) - 1u;
        const __mmask32 high_mask = values > 32 ? (1u << (values - 32)) - 1u : 0u;
        _mm512_mask_storeu_epi16(pixels + 3 * x, low_mask, low);
        _mm512_mask_storeu_epi16(pixels + 3 * x + 32, high_mask, high);
      }
    }
  });
#endif
  return out;
}

}  // namespace detrkit
