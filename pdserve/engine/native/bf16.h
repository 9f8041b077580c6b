// Conversions between the storage types of the native kernels and their float32 arithmetic.
// Shared by every source in this directory (native_kernels.py hashes it into the build key).
#pragma once

#include <c10/util/BFloat16.h>

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

}  // namespace pdserve_native
