// Conversions between the storage types of the native kernels and their float32 arithmetic.
// Shared by every source in this directory (native_kernels.py hashes it into the build key).
#pragma once

#include <c10/util/BFloat16.h>

#include "isa.h"

#include <cstdint>
#include <cstring>

namespace pdserve_native {

inline float widen(float value) { return value; }

// A bfloat16 is the top half of a float32: widening is a shift, which vectorizes.
inline float widen(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline T narrow(float value) { return static_cast<T>(value); }  // bfloat16: round to nearest even

#ifdef __AVX512F__
// 16 consecutive values widened to float32 lanes, as widen() does one.
inline __m512 widen16(const float* values) { return _mm512_loadu_ps(values); }

inline __m512 widen16(const c10::BFloat16* values) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

}  // namespace pdserve_native
