// Scaled dot-product attention for bf16 inference on CPUs with AMX: per head,
// softmax(Q K^T / sqrt(d) over the keys not padded) V, written as [B, Lq, heads * d].
//
// Why not torch's CPU flash attention: in bf16 it runs its two products through a general GEMM
// on blocks of 512 keys, and spends most of its time in the softmax's passes over the scores (a
// scaled max, an exp and sum, a conversion), each with torch's general-purpose exp, besides the
// rescaling that the online softmax needs between key blocks. Here:
// - the keys of a head are few enough (DETR's encoder: one per C5 pixel) that a block of query
//   rows holds all its scores: the softmax is exact in two passes over a row (max; then exp,
//   sum and bf16 rounding), with no rescaling;
// - both products run as AMX batch-reduce GEMMs (torch's cpublas::brgemm, oneDNN's ukernel) on
//   keys and values put once per head into the pair-interleaved ("VNNI") layout AMX reads;
// - exp is a cubic polynomial of 2^f: its relative error, 7.5e-5, is a fiftieth of the bf16
//   rounding (3.9e-3) that the weights get before the second product, as in torch's kernel.
// The weights are rounded to bf16 and their sum taken in fp32 before rounding, as torch's flash
// attention does; a query whose keys are all padded gets zeros.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

// Keys per block of K^T: the N of one score product.
constexpr int64_t kKeyBlock = 64;
// Largest score buffer per thread (fp32): a block of query rows times all keys, kept in L2.
constexpr int64_t kScoreBytes = 1 << 20;

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define DETRKIT_ATTENTION_KERNEL 1
#include <immintrin.h>

// 2^t, lane by lane: 2^floor(t) (scalef) times a cubic of the fraction (minimax, relative error
// 7.5e-5 on [0, 1)). Lanes below -126 (-inf for a masked key) give 0, so no result is
// subnormal; NaN stays NaN.
inline __m512 exp2_lanes(__m512 t) {
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.07802347838878632f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606617212295532f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6958352327346802f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999924898147583f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

inline void store_bf16(bf16* p, __m512 x) {
  const __m256bh narrow = _mm512_cvtneps_pbh(x);  // round to nearest even, as torch's cast
  std::memcpy(p, &narrow, sizeof(narrow));
}

// K^T of keys [first, first + kKeyBlock) of one head, in AMX's layout for a B operand [d, keys]:
// [d / 2][padded keys][2], the two values of a pair of channels side by side. A key's row holds
// exactly those pairs, so the layout is a transpose of 32-bit words: gathered 16 keys at a time
// (byte offsets, so a row may start at any bf16). Keys past `count` are 0.
void pack_keys(const bf16* key, int64_t row_stride, int64_t count, int64_t d, int64_t stride,
               bf16* out) {
  int32_t* words = reinterpret_cast<int32_t*>(out);
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(row_stride * sizeof(bf16))));
  for (int64_t j = 0; j < kKeyBlock; j += 16) {
    const int64_t present = std::clamp<int64_t>(count - j, 0, 16);
    const __mmask16 valid = static_cast<__mmask16>((1u << present) - 1u);
    const bf16* first = key + j * row_stride;
    for (int64_t i = 0; i < d / 2; ++i) {
      const __m512i pairs =
          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows, first + 2 * i, 1);
      _mm512_storeu_si512(words + i * stride + j, pairs);
    }
  }
}

// V of one head in AMX's layout for a B operand [keys, d]: [keys / 2][d][2], rows 2i and 2i + 1
// interleaved. Rows from `count` to `padded` are 0.
void pack_values(const bf16* value, int64_t row_stride, int64_t count, int64_t padded, int64_t d,
                 bf16* out) {
  // 16-bit lanes of (even, odd) for channels 0-15, then 16-31, of a 32-channel chunk.
  alignas(64) uint16_t low[32], high[32];
  for (int i = 0; i < 16; ++i) {
    low[2 * i] = i, low[2 * i + 1] = 32 + i;
    high[2 * i] = 16 + i, high[2 * i + 1] = 48 + i;
  }
  const __m512i take_low = _mm512_load_si512(low), take_high = _mm512_load_si512(high);
  for (int64_t j = 0; j < padded; j += 2) {
    const __mmask32 even = j < count ? ~0u : 0u, odd = j + 1 < count ? ~0u : 0u;
    bf16* pair = out + j * d;
    for (int64_t c = 0; c < d; c += 32) {
      const __m512i a = _mm512_maskz_loadu_epi16(even, value + j * row_stride + c);
      const __m512i b = _mm512_maskz_loadu_epi16(odd, value + (j + 1) * row_stride + c);
      _mm512_storeu_si512(pair + 2 * c, _mm512_permutex2var_epi16(a, take_low, b));
      _mm512_storeu_si512(pair + 2 * c + 32, _mm512_permutex2var_epi16(a, take_high, b));
    }
  }
}

// The largest of x[0 : count], with four running maxima (one would wait on the previous max's
// latency at every vector); a masked load for the last count % 16.
inline float row_max(const float* x, int64_t count) {
  __m512 top[4];
  for (auto& t : top) t = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 64 <= count; j += 64) {
    for (int u = 0; u < 4; ++u) top[u] = _mm512_max_ps(top[u], _mm512_loadu_ps(x + j + 16 * u));
  }
  for (; j + 16 <= count; j += 16) top[0] = _mm512_max_ps(top[0], _mm512_loadu_ps(x + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1u);
  top[1] = _mm512_mask_max_ps(top[1], tail, top[1], _mm512_maskz_loadu_ps(tail, x + j));
  return _mm512_reduce_max_ps(
      _mm512_max_ps(_mm512_max_ps(top[0], top[1]), _mm512_max_ps(top[2], top[3])));
}

// One row of scores s into bf16 weights exp(scale * (s - max)), the softmax's numerators, over
// keys [0, count); returns 1 / their sum, 0 for a row with no key (all -inf), whose weights are
// then 0, and NaN for a row of -inf and NaN. Weights past count are not written. In base 2:
// exp(x) = 2^(log2(e) x).
float softmax_row(const float* s, int64_t count, float scale, bf16* weights) {
  const float largest = row_max(s, count);
  if (largest == -std::numeric_limits<float>::infinity()) {
    std::fill(weights, weights + count, bf16(0.0f));
    // The maxima pass NaN over (max gives its second operand when either is NaN), so a row whose
    // only scores that are not -inf are NaN lands here: its output must be NaN, not zeros.
    const bool nan = std::any_of(s, s + count, [](float x) { return std::isnan(x); });
    return nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  }
  const float factor = scale * 1.44269504088896341f;
  const __m512 c = _mm512_set1_ps(factor), shift = _mm512_set1_ps(-largest * factor);
  const auto weight = [&](int64_t j) {
    const __m512 e = exp2_lanes(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), c, shift));
    store_bf16(weights + j, e);
    return e;
  };
  // Two running sums, for the same reason as row_max's maxima.
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) {
    even = _mm512_add_ps(even, weight(j));
    odd = _mm512_add_ps(odd, weight(j + 16));
  }
  for (; j + 16 <= count; j += 16) even = _mm512_add_ps(even, weight(j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1u);
  const __m512 last = _mm512_maskz_mov_ps(
      tail, exp2_lanes(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, s + j), c, shift)));
  const __m256bh narrow = _mm512_cvtneps_pbh(last);
  __m256i bits;
  std::memcpy(&bits, &narrow, sizeof(bits));
  _mm256_mask_storeu_epi16(weights + j, tail, bits);
  return 1.0f / _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(even, odd), last));
}
#endif

}  // namespace

namespace detrkit {

bool attention_kernel_available() {
#ifdef DETRKIT_ATTENTION_KERNEL
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

at::Tensor attention_forward(const at::Tensor& query, const at::Tensor& key,
                             const at::Tensor& value, int64_t heads,
                             const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(attention_kernel_available(),
              "attention: this CPU or build has no AMX bf16 products");
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3,
              "attention: query, key and value must be [B, L, C]");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16,
              "attention: query, key and value must be bf16");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "attention: tensors must be on the CPU");
  const int64_t B = query.size(0), Lq = query.size(1), C = query.size(2), Lk = key.size(1);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == Lk &&
                  key.size(2) == C && value.size(2) == C,
              "attention: key and value must be [B, Lk, C] for a query [B, Lq, C]");
  TORCH_CHECK(heads > 0 && C % heads == 0 && (C / heads) % 32 == 0,
              "attention: the channels per head must be a multiple of 32");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1 && value.stride(2) == 1,
              "attention: channels must be contiguous");
  // The query's rows are a GEMM operand (a row stride of at least its length); 16 key rows are
  // gathered with 32-bit byte offsets.
  TORCH_CHECK(Lq <= 1 || query.stride(1) >= C, "attention: query rows must not overlap");
  TORCH_CHECK(16 * key.stride(1) * static_cast<int64_t>(sizeof(c10::BFloat16)) <
                  (int64_t{1} << 31),
              "attention: the key's row stride is too large");
  TORCH_CHECK(Lk > 0, "attention: there must be keys");
  const bool* padding = nullptr;
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == B && key_padding_mask->size(1) == Lk &&
                    key_padding_mask->is_contiguous(),
                "attention: key_padding_mask must be a contiguous bool [B, Lk]");
    padding = key_padding_mask->data_ptr<bool>();
  }
  auto out = at::empty({B, Lq, C}, query.options());
#ifdef DETRKIT_ATTENTION_KERNEL
  const int64_t d = C / heads;
  const int64_t padded = (Lk + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t blocks = padded / kKeyBlock;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Rows of queries per task: as many as keep the scores within kScoreBytes, 16 to 64.
  const int64_t rows = std::clamp<int64_t>(kScoreBytes / (padded * 4) / 16 * 16, 16, 64);
  const int64_t row_blocks = (Lq + rows - 1) / rows;

  // -inf on the scores of padded keys, 0 elsewhere, for the images that have any.
  std::vector<float> mask;
  std::vector<char> padded_image(B, 0);
  if (padding != nullptr) {
    mask.assign(B * Lk, 0.0f);
    for (int64_t i = 0; i < B * Lk; ++i) {
      if (padding[i]) {
        mask[i] = -std::numeric_limits<float>::infinity();
        padded_image[i / Lk] = 1;
      }
    }
  }
  // Keys and values of each image and head in AMX's layout, made once per call.
  // (Not zeroed: every element is written.)
  std::unique_ptr<bf16[]> keys(new bf16[B * heads * padded * d]);
  std::unique_ptr<bf16[]> values(new bf16[B * heads * padded * d]);
  const bf16* q = query.data_ptr<bf16>();
  const int64_t query_rows = Lq > 1 ? query.stride(1) : C;  // one row: any stride
  const bf16* k = key.data_ptr<bf16>();
  const bf16* v = value.data_ptr<bf16>();
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const bf16* head_keys = k + b * key.stride(0) + h * d;
      for (int64_t n = 0; n < blocks; ++n) {
        pack_keys(head_keys + n * kKeyBlock * key.stride(1), key.stride(1),
                  std::min(kKeyBlock, Lk - n * kKeyBlock), d, padded,
                  keys.get() + bh * padded * d + n * kKeyBlock * 2);
      }
      pack_values(v + b * value.stride(0) + h * d, value.stride(1), Lk, padded, d,
                  values.get() + bh * padded * d);
    }
  });

  bf16* o = out.data_ptr<bf16>();
  at::parallel_for(0, B * heads * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(rows * padded), attended(rows * d), inverse(rows);
    // Zeroed once: the weights of the padding keys (from Lk on) are never written.
    std::vector<bf16> weights(rows * padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / row_blocks, b = bh / heads, h = bh % heads;
      const int64_t first = (task % row_blocks) * rows, M = std::min(rows, Lq - first);
      const bf16* head_queries = q + b * query.stride(0) + first * query_rows + h * d;
      // scores [M, padded] = Q K^T
      at::native::cpublas::brgemm(M, padded, d, query_rows, padded, padded, false,
                                  head_queries, keys.get() + bh * padded * d, scores.data());
      for (int64_t r = 0; r < M; ++r) {
        float* row = scores.data() + r * padded;
        if (padded_image[b]) {
          for (int64_t j = 0; j < Lk; ++j) row[j] += mask[b * Lk + j];
        }
        inverse[r] = softmax_row(row, Lk, scale, weights.data() + r * padded);
      }
      // attended [M, d] = weights V
      at::native::cpublas::brgemm(M, d, padded, padded, d, d, false, weights.data(),
                                  values.get() + bh * padded * d, attended.data());
      for (int64_t r = 0; r < M; ++r) {
        bf16* row = o + (b * Lq + first + r) * C + h * d;
        const __m512 factor = _mm512_set1_ps(inverse[r]);
        for (int64_t c = 0; c < d; c += 16) {
          store_bf16(row + c, _mm512_mul_ps(_mm512_loadu_ps(&attended[r * d + c]), factor));
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
#endif
  return out;
}

}  // namespace detrkit
