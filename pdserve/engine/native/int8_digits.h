// Rows of activations as int8 digits: one (w8a8) or two (w8a16, about 15 bits), for the int8
// x int8 layers (int8_rows.cpp) and the int4 x int8 layer (int4_linear.cpp).
//
// Arithmetic: scale = max|row| / 127; v = x * (127 / max|row|); q1 = round_half_even(v), in
// [-127, 127]; with two digits also q2 = round_half_even((v - q1) * 254), in [-127, 127] since
// |v - q1| <= 1/2: x ~ scale * (q1 + q2 / 254). An all-zero row gets scale 0 and q = 0. The
// second digits are rows T..2T-1 of q.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"

namespace pdserve_native {

constexpr float kInt8Max = 127.0f;
constexpr float kSecondDigit = 254.0f;  // a first digit's rounding error, +-1/2, spans [-127, 127]

#ifdef __AVX512F__
// round half to even, then clamped to [-127, 127]: the digit as a float.
inline __m512 digit16(__m512 value) {
  const __m512 rounded = _mm512_roundscale_ps(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(_mm512_set1_ps(kInt8Max), _mm512_max_ps(_mm512_set1_ps(-kInt8Max), rounded));
}

inline void store_digits16(int8_t* target, __m512 digit) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(target), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(digit)));
}

#endif

template <int kDigits, typename scalar_t>
void quantize(const scalar_t* x, int64_t x_stride, int8_t* q, float* scales, int64_t num_rows, int64_t width) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * x_stride;
      float max_abs = 0.0f;
      int64_t i = 0;
#ifdef __AVX512F__
      __m512 peaks = _mm512_setzero_ps();
      for (; i + 16 <= width; i += 16) peaks = _mm512_max_ps(peaks, _mm512_abs_ps(widen16(row + i)));
      max_abs = _mm512_reduce_max_ps(peaks);
#endif
      for (; i < width; ++i) max_abs = std::max(max_abs, std::fabs(widen(row[i])));
      // In double, rounded once to float: -ffast-math may turn a division into a product by a
      // reciprocal, which in float can miss the correctly rounded quotient torch computes.
      const float inverse = max_abs > 0.0f ? static_cast<float>(127.0 / static_cast<double>(max_abs)) : 0.0f;
      int8_t* target = q + r * width;
      int8_t* second = q + (num_rows + r) * width;
      i = 0;
#ifdef __AVX512F__
      const __m512 inverses = _mm512_set1_ps(inverse);
      for (; i + 16 <= width; i += 16) {
        const __m512 value = _mm512_mul_ps(widen16(row + i), inverses);
        const __m512 first = digit16(value);
        store_digits16(target + i, first);
        if constexpr (kDigits == 2) {
          store_digits16(second + i, digit16(_mm512_mul_ps(_mm512_sub_ps(value, first), _mm512_set1_ps(kSecondDigit))));
        }
      }
#endif
      for (; i < width; ++i) {  // the tail, or every column without AVX-512
        // nearbyint rounds half to even in the default rounding mode, as torch.round does.
        const float value = widen(row[i]) * inverse;
        const float first = std::min(kInt8Max, std::max(-kInt8Max, std::nearbyint(value)));
        target[i] = static_cast<int8_t>(first);
        if constexpr (kDigits == 2) {
          const float rest = std::nearbyint((value - first) * kSecondDigit);
          second[i] = static_cast<int8_t>(std::min(kInt8Max, std::max(-kInt8Max, rest)));
        }
      }
      scales[r] = static_cast<float>(static_cast<double>(max_abs) / 127.0);
    }
  });
}

}  // namespace pdserve_native
