// x @ W.T for a few rows of x against 4-bit weights, in integer arithmetic (AVX512-VNNI), for
// int4_linear.py. A decode step of a small model is bound by reading its weights. torch's int4
// kernel unpacks every nibble to bf16 and multiplies in floating point: on the 2-core Xeon it read
// weights at about 9 GB/s, half of what memory gives. Here the nibbles stay integers: the
// activations are quantized per row to two int8 digits (int8_digits.h, about 15 bits) and the
// VNNI instruction multiplies 64 nibble x digit pairs at once, summing them in int32.
//
// Weights are groupwise asymmetric, as llama.cpp's Q4_1: w = d * q + m with q in 0..15 and fp16 d
// and m for each group of 32 inputs of an output row (a Q4_1 matrix is represented exactly).
//
// Arithmetic: with x ~ s * (a + b / 254) (two digits, int8_digits.h) and a group's integer sums
// A = sum q * a, B = sum q * b, Xa = sum a, Xb = sum b (exact, int32):
//   out[t, o] = s_t * sum_groups (d * (A + B / 254) + m * (Xa + Xb / 254))   (+ residual)
// i.e. the weights exactly times the two-digit activations, sums in float32, rounded once to the
// output dtype.
//
// Packed layout (int4_linear.py packs it): [out / 16 row blocks][in / 32 groups][320 bytes]. A
// (row block, group) is 256 bytes of nibbles then 16 fp16 d and 16 fp16 m. Byte 64 c + 4 r + b
// holds q[r, 8 c + b] in its low nibble and q[r, 8 c + 4 + b] in its high one (r the row within
// the block): unpacked, each 64-byte vector holds 4 consecutive inputs of each of the 16 rows, so
// the VNNI sums land one row a lane, with no horizontal sums. A row block's groups lie back to
// back: the kernel streams memory in order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "int8_digits.h"

namespace {

using pdserve_native::narrow;

constexpr int64_t kRowsPerBlock = 16;
constexpr int64_t kGroup = 32;
constexpr int64_t kBlockBytes = 320;  // 256 bytes of nibbles, 16 fp16 d, 16 fp16 m
constexpr int64_t kMaxRows = 4;       // rows of x multiplied per pass over the weights

bool vnni_available() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
template <int T, typename out_t>
void multiply_blocks(const int8_t* digits, int64_t digit_stride, const float* digit_sums, const float* scales,
                     const uint8_t* packed, const out_t* residual, out_t* out, int64_t in_features,
                     int64_t out_features, int64_t begin, int64_t end) {
  const int64_t groups = in_features / kGroup;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512 inverse_second = _mm512_set1_ps(1.0f / pdserve_native::kSecondDigit);
  for (int64_t block = begin; block < end; ++block) {
    const uint8_t* weights = packed + block * groups * kBlockBytes;
    __m512 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g, weights += kBlockBytes) {
      // Eight groups (2.5 KB) ahead: a group is five cache lines, too few for the hardware
      // prefetcher alone (one row, 2 threads, SmolLM2 shapes: two groups ahead read weights at
      // 10.9-15.7 GB/s, eight at 10.6-22.1; gate_up 70.7 -> 50.2 us).
      for (int line = 0; line < kBlockBytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(weights + 8 * kBlockBytes + line), _MM_HINT_T0);
      __m512i q[8];
      for (int c = 0; c < 4; ++c) {
        const __m512i bytes = _mm512_loadu_si512(weights + 64 * c);
        q[2 * c] = _mm512_and_si512(bytes, low_nibbles);
        q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + 256)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + 288)));
      for (int t = 0; t < T; ++t) {
        const int8_t* a = digits + t * in_features + g * kGroup;
        const int8_t* b = a + digit_stride;
        // Two accumulators a digit: chains of four dependent VNNI instructions, not eight.
        __m512i a_even = _mm512_setzero_si512(), a_odd = _mm512_setzero_si512();
        __m512i b_even = _mm512_setzero_si512(), b_odd = _mm512_setzero_si512();
        for (int j = 0; j < 8; j += 2) {
          int32_t a0, a1, b0, b1;
          std::memcpy(&a0, a + 4 * j, 4);
          std::memcpy(&a1, a + 4 * j + 4, 4);
          std::memcpy(&b0, b + 4 * j, 4);
          std::memcpy(&b1, b + 4 * j + 4, 4);
          a_even = _mm512_dpbusd_epi32(a_even, q[j], _mm512_set1_epi32(a0));
          a_odd = _mm512_dpbusd_epi32(a_odd, q[j + 1], _mm512_set1_epi32(a1));
          b_even = _mm512_dpbusd_epi32(b_even, q[j], _mm512_set1_epi32(b0));
          b_odd = _mm512_dpbusd_epi32(b_odd, q[j + 1], _mm512_set1_epi32(b1));
        }
        const __m512 first = _mm512_cvtepi32_ps(_mm512_add_epi32(a_even, a_odd));
        const __m512 second = _mm512_cvtepi32_ps(_mm512_add_epi32(b_even, b_odd));
        const __m512 products = _mm512_fmadd_ps(second, inverse_second, first);
        acc[t] = _mm512_fmadd_ps(d, products, acc[t]);
        acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(digit_sums[t * groups + g]), acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      alignas(64) float lanes[kRowsPerBlock];
      _mm512_store_ps(lanes, _mm512_mul_ps(acc[t], _mm512_set1_ps(scales[t])));
      out_t* target = out + t * out_features + block * kRowsPerBlock;
      const out_t* add = residual == nullptr ? nullptr : residual + t * out_features + block * kRowsPerBlock;
      for (int r = 0; r < kRowsPerBlock; ++r) {
        target[r] = narrow<out_t>(add == nullptr ? lanes[r] : lanes[r] + pdserve_native::widen(add[r]));
      }
    }
  }
}

template <int T, typename out_t>
void multiply_pass(const int8_t* digits, int64_t digit_stride, const float* digit_sums, const float* scales,
                   const uint8_t* packed, const out_t* residual, out_t* out, int64_t in_features,
                   int64_t out_features) {
  // 8 row blocks (128 output rows, 40 KB at 576 inputs) a task.
  at::parallel_for(0, out_features / kRowsPerBlock, 8, [&](int64_t begin, int64_t end) {
    multiply_blocks<T>(digits, digit_stride, digit_sums, scales, packed, residual, out, in_features, out_features,
                       begin, end);
  });
}
#endif

template <typename scalar_t>
void run(const scalar_t* x, const uint8_t* packed, const scalar_t* residual, scalar_t* out, int64_t num_rows,
         int64_t in_features, int64_t out_features) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const int64_t groups = in_features / kGroup;
  std::vector<int8_t> digits(2 * num_rows * in_features);
  std::vector<float> scales(num_rows);
  pdserve_native::quantize<2>(x, in_features, digits.data(), scales.data(), num_rows, in_features);
  // Each group's sum of x in digit units (Xa + Xb / 254), for the groups' m terms.
  std::vector<float> digit_sums(num_rows * groups);
  for (int64_t t = 0; t < num_rows; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      int32_t first = 0, second = 0;
      for (int64_t i = g * kGroup; i < (g + 1) * kGroup; ++i) {
        first += digits[t * in_features + i];
        second += digits[(num_rows + t) * in_features + i];
      }
      digit_sums[t * groups + g] = static_cast<float>(first) + static_cast<float>(second) / pdserve_native::kSecondDigit;
    }
  }
  const int64_t digit_stride = num_rows * in_features;
  for (int64_t start = 0; start < num_rows; start += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, num_rows - start);
    const int8_t* pass_digits = digits.data() + start * in_features;
    const float* pass_sums = digit_sums.data() + start * groups;
    const float* pass_scales = scales.data() + start;
    const scalar_t* pass_residual = residual == nullptr ? nullptr : residual + start * out_features;
    scalar_t* pass_out = out + start * out_features;
    switch (rows) {
      case 1: multiply_pass<1>(pass_digits, digit_stride, pass_sums, pass_scales, packed, pass_residual, pass_out, in_features, out_features); break;
      case 2: multiply_pass<2>(pass_digits, digit_stride, pass_sums, pass_scales, packed, pass_residual, pass_out, in_features, out_features); break;
      case 3: multiply_pass<3>(pass_digits, digit_stride, pass_sums, pass_scales, packed, pass_residual, pass_out, in_features, out_features); break;
      default: multiply_pass<4>(pass_digits, digit_stride, pass_sums, pass_scales, packed, pass_residual, pass_out, in_features, out_features);
    }
  }
#else
  TORCH_CHECK(false, "int4_linear needs AVX512-VNNI (int4_vnni_available() is false here)");
#endif
}

// x: [rows, in] float32 or bfloat16, contiguous; packed: uint8 [out / 16, in / 32, 320] (layout
// above); residual: None or [rows, out] of x's dtype, contiguous. Returns [rows, out] in x's dtype.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "int4_linear runs on the CPU");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.size(2) == kBlockBytes,
              "packed must be a contiguous uint8 [out / 16, in / 32, 320]");
  const int64_t out_features = packed.size(0) * kRowsPerBlock, in_features = packed.size(1) * kGroup;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == in_features,
              "x must be a contiguous [rows, in] matching the packed weight");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
  const at::Tensor* add = nullptr;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({x.size(0), out_features}) && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must be a contiguous [rows, out] of x's dtype");
    add = &residual.value();
  }
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0) return out;
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<c10::BFloat16>(), packed.data_ptr<uint8_t>(), add ? add->data_ptr<c10::BFloat16>() : nullptr,
        out.data_ptr<c10::BFloat16>(), x.size(0), in_features, out_features);
  } else {
    run(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), add ? add->data_ptr<float>() : nullptr,
        out.data_ptr<float>(), x.size(0), in_features, out_features);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor? residual) -> Tensor");
  m.def("int4_vnni_available() -> bool", &vnni_available);  // no tensor argument: one kernel for all
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("int4_linear", &int4_linear); }
