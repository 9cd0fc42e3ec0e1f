// Vectors of kLanes numbers (GCC/Clang vector extensions), and their loads and stores in a
// narrower type: the building blocks of detrkit's CPU kernels that run over channels.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace detrkit::simd {

// Whether T is a bfloat16 type, widened to fp32 by a shift in load_lanes; a framework that has
// one specialises this for it.
template <typename T>
struct is_bfloat16 : std::false_type {};

// Channels are processed as vectors of 16 lanes of the accumulation type (GCC/Clang vector
// extensions; one AVX-512 register of fp32, two elsewhere). Spelled out because, left to itself,
// the compiler vectorised the loop over taps with gathers instead of the contiguous channels, and
// kept the accumulators in memory.
constexpr int kLanes = 16;

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
#if defined(__AVX512F__)
    // One widening of all 16 lanes: the vector extension's form below compiles to two halves.
    const __m512i wide = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
    std::memcpy(&x, &wide, sizeof(x));
#else
    typedef uint16_t bits16 __attribute__((vector_size(kLanes * 2)));
    typedef uint32_t bits32 __attribute__((vector_size(kLanes * 4)));
    bits16 narrow;
    std::memcpy(&narrow, p, sizeof(narrow));
    const bits32 wide = __builtin_convertvector(narrow, bits32) << 16;
    std::memcpy(&x, &wide, sizeof(x));
#endif
  } else {
    for (int i = 0; i < kLanes; ++i) x[i] = static_cast<acc_t>(p[i]);
  }
  return x;
}

// Writes x into p in p's type, rounding to nearest even into bf16 (NaN stays NaN) as bf16's
// conversion from fp32 does, lane by lane in one pass.
template <typename acc_t, typename scalar_t>
inline void store_narrow(scalar_t* p, const lanes_t<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &x, sizeof(x));
  } else if constexpr (is_bfloat16<scalar_t>::value && std::is_same_v<acc_t, float>) {
    typedef uint16_t bits16 __attribute__((vector_size(kLanes * 2)));
    typedef uint32_t bits32 __attribute__((vector_size(kLanes * 4)));
    bits32 bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    rounded = (x != x) ? bits32{} + 0x7FC0u : rounded;
    const bits16 narrow = __builtin_convertvector(rounded, bits16);
    std::memcpy(p, &narrow, sizeof(narrow));
  } else {
    for (int i = 0; i < kLanes; ++i) p[i] = static_cast<scalar_t>(x[i]);
  }
}

template <typename acc_t>
inline void store_lanes(acc_t* p, const lanes_t<acc_t>& x) {
  std::memcpy(p, &x, sizeof(x));
}

// The sum, or with kMax the largest, of x's lanes.
template <typename acc_t, bool kMax = false>
inline acc_t reduce_lanes(const lanes_t<acc_t>& x) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && kLanes == 16) {
    __m512 v;
    std::memcpy(&v, &x, sizeof(v));
    return kMax ? _mm512_reduce_max_ps(v) : _mm512_reduce_add_ps(v);
  }
#endif
  acc_t result = x[0];
  for (int i = 1; i < kLanes; ++i) result = kMax ? (x[i] > result ? x[i] : result) : result + x[i];
  return result;
}

template <typename acc_t>
inline acc_t sum_lanes(const lanes_t<acc_t>& x) {
  return reduce_lanes<acc_t>(x);
}

}  // namespace detrkit::simd
