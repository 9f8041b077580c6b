// x @ W.T for a few rows of x against 4-bit weights, in integer arithmetic, for layers/int4.py. A decode step of a small model is bound by reading its weights. torch's int4
// kernel unpacks every nibble to bf16 and multiplies in floating point: on the 2-core Xeon it read
// weights at about 9 GB/s, half of what memory gives. Here the nibbles stay integers: the
// activations are quantized per row to two int8 digits (int8_digits.h, about 15 bits) and the
// nibbles are multiplied by the digits in integer arithmetic, summed in int32.
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
// Packed layout (layers/int4.py packs it): [out / 16 row blocks][in / 32 groups][320 bytes]. A
// (row block, group) is 256 bytes of nibbles then 16 fp16 d and 16 fp16 m. Byte 64 c + 4 r + b
// holds q[r, 8 c + b] in its low nibble and q[r, 8 c + 4 + b] in its high one (r the row within
// the block): unpacked, each 64-byte vector holds 4 consecutive inputs of each of the 16 rows, so
// the VNNI sums land one row a lane, with no horizontal sums. A row block's groups lie back to
// back: the kernel streams memory in order.
//
// Paths, by the build's instruction set:
// - AVX512-VNNI: vpdpbusd multiplies 64 nibble x digit pairs and sums them by 4 into int32.
// - AVX2: each 64-byte vector is two 32-byte halves, rows 0-7 and 8-15. vpmaddubsw multiplies
//   32 pairs and sums them by 2 into int16; a group's 8 such products are summed in int16 (at
//   most 8 x 2 x 15 x 127 = 30,480, no saturation) and vpmaddwd by ones widens them to int32
//   once a group, as the fastest AVX2 engines do.
// - portable: the same integer sums in scalar code, for any CPU.
// All three compute the same exact integer sums, then the same float32 operations in the same
// order, so their results agree to the rounding of fused multiply-adds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bf16.h"
#include "isa.h"
#include "int8_digits.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::kSecondDigit;

constexpr int64_t kRowsPerBlock = 16;
constexpr int64_t kGroup = 32;
constexpr int64_t kBlockBytes = 320;  // 256 bytes of nibbles, 16 fp16 d, 16 fp16 m
constexpr int64_t kDOffset = 256, kMOffset = 288;
constexpr int64_t kMaxRows = 4;       // rows of x multiplied per pass over the weights
// Eight groups (2.5 KB) ahead: a group is five cache lines, too few for the hardware prefetcher
// alone (one row, 2 threads, SmolLM2 shapes, AVX512-VNNI: two groups ahead read weights at
// 10.9-15.7 GB/s, eight at 10.6-22.1; gate_up 70.7 -> 50.2 us).
constexpr int64_t kPrefetchGroups = 8;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PDSERVE_INT4_VNNI 1
constexpr const char* kPath = "avx512_vnni";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PDSERVE_INT4_AVX2 1
#if defined(__AVX512F__)
constexpr const char* kPath = "avx2 (no avx512_vnni)";
#else
constexpr const char* kPath = "avx2";
#endif
#else
constexpr const char* kPath = "portable";
#endif

// One pass's activations: T rows' first digits (row t at first + t * in_features), their second
// digits second_offset bytes further, and each (row, group)'s digit sum Xa + Xb / 254.
struct Digits {
  const int8_t* first;
  int64_t second_offset;
  const float* group_sums;  // [rows][groups]
  int64_t in_features, groups;
};

inline float half_at(const uint8_t* bytes) {
  uint16_t bits;
  std::memcpy(&bits, bytes, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline int32_t four_digits(const int8_t* digits) {
  int32_t packed;
  std::memcpy(&packed, digits, 4);
  return packed;
}

#if defined(PDSERVE_INT4_VNNI)
// sums[t][r] = sum over groups of d (A + B / 254) + m (Xa + Xb / 254), row r of the block.
template <int T>
void accumulate_block(const Digits& x, const uint8_t* weights, float sums[][kRowsPerBlock]) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512 inverse_second = _mm512_set1_ps(1.0f / kSecondDigit);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < x.groups; ++g, weights += kBlockBytes) {
    for (int line = 0; line < kBlockBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(weights + kPrefetchGroups * kBlockBytes + line), _MM_HINT_T0);
    __m512i q[8];
    for (int c = 0; c < 4; ++c) {
      const __m512i bytes = _mm512_loadu_si512(weights + 64 * c);
      q[2 * c] = _mm512_and_si512(bytes, low_nibbles);
      q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + kDOffset)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + kMOffset)));
    for (int t = 0; t < T; ++t) {
      const int8_t* a = x.first + t * x.in_features + g * kGroup;
      const int8_t* b = a + x.second_offset;
      // Two accumulators a digit: chains of four dependent VNNI instructions, not eight.
      __m512i a_even = _mm512_setzero_si512(), a_odd = _mm512_setzero_si512();
      __m512i b_even = _mm512_setzero_si512(), b_odd = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {
        a_even = _mm512_dpbusd_epi32(a_even, q[j], _mm512_set1_epi32(four_digits(a + 4 * j)));
        a_odd = _mm512_dpbusd_epi32(a_odd, q[j + 1], _mm512_set1_epi32(four_digits(a + 4 * j + 4)));
        b_even = _mm512_dpbusd_epi32(b_even, q[j], _mm512_set1_epi32(four_digits(b + 4 * j)));
        b_odd = _mm512_dpbusd_epi32(b_odd, q[j + 1], _mm512_set1_epi32(four_digits(b + 4 * j + 4)));
      }
      const __m512 first = _mm512_cvtepi32_ps(_mm512_add_epi32(a_even, a_odd));
      const __m512 second = _mm512_cvtepi32_ps(_mm512_add_epi32(b_even, b_odd));
      const __m512 products = _mm512_fmadd_ps(second, inverse_second, first);
      acc[t] = _mm512_fmadd_ps(d, products, acc[t]);
      acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x.group_sums[t * x.groups + g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(sums[t], acc[t]);
}

#elif defined(PDSERVE_INT4_AVX2)
// As the VNNI path, each 64-byte vector taken as two halves of 8 rows (see the header).
template <int T>
void accumulate_block(const Digits& x, const uint8_t* weights, float sums[][kRowsPerBlock]) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 inverse_second = _mm256_set1_ps(1.0f / kSecondDigit);
  __m256 acc[2][T];
  for (int h = 0; h < 2; ++h)
    for (int t = 0; t < T; ++t) acc[h][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < x.groups; ++g, weights += kBlockBytes) {
    for (int line = 0; line < kBlockBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(weights + kPrefetchGroups * kBlockBytes + line), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      __m256i q[8];
      for (int c = 0; c < 4; ++c) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + 64 * c + 32 * h));
        q[2 * c] = _mm256_and_si256(bytes, low_nibbles);
        q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + kDOffset + 16 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weights + kMOffset + 16 * h)));
      for (int t = 0; t < T; ++t) {
        const int8_t* a = x.first + t * x.in_features + g * kGroup;
        const int8_t* b = a + x.second_offset;
        __m256i a_pairs = _mm256_maddubs_epi16(q[0], _mm256_set1_epi32(four_digits(a)));
        __m256i b_pairs = _mm256_maddubs_epi16(q[0], _mm256_set1_epi32(four_digits(b)));
        for (int j = 1; j < 8; ++j) {
          a_pairs = _mm256_add_epi16(a_pairs, _mm256_maddubs_epi16(q[j], _mm256_set1_epi32(four_digits(a + 4 * j))));
          b_pairs = _mm256_add_epi16(b_pairs, _mm256_maddubs_epi16(q[j], _mm256_set1_epi32(four_digits(b + 4 * j))));
        }
        const __m256 first = _mm256_cvtepi32_ps(_mm256_madd_epi16(a_pairs, ones));
        const __m256 second = _mm256_cvtepi32_ps(_mm256_madd_epi16(b_pairs, ones));
        const __m256 products = _mm256_fmadd_ps(second, inverse_second, first);
        acc[h][t] = _mm256_fmadd_ps(d, products, acc[h][t]);
        acc[h][t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x.group_sums[t * x.groups + g]), acc[h][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    _mm256_storeu_ps(sums[t], acc[0][t]);
    _mm256_storeu_ps(sums[t] + 8, acc[1][t]);
  }
}

#else
// The same sums in scalar code: byte 64 c + 4 r + b holds q[r, 8 c + b] | q[r, 8 c + 4 + b] << 4.
template <int T>
void accumulate_block(const Digits& x, const uint8_t* weights, float sums[][kRowsPerBlock]) {
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < kRowsPerBlock; ++r) sums[t][r] = 0.0f;
  for (int64_t g = 0; g < x.groups; ++g, weights += kBlockBytes) {
    for (int t = 0; t < T; ++t) {
      const int8_t* a = x.first + t * x.in_features + g * kGroup;
      const int8_t* b = a + x.second_offset;
      for (int r = 0; r < kRowsPerBlock; ++r) {
        int32_t first = 0, second = 0;
        for (int c = 0; c < 4; ++c) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t byte = weights[64 * c + 4 * r + i];
            const int32_t low = byte & 0x0F, high = byte >> 4;
            first += low * a[8 * c + i] + high * a[8 * c + 4 + i];
            second += low * b[8 * c + i] + high * b[8 * c + 4 + i];
          }
        }
        const float products = static_cast<float>(second) * (1.0f / kSecondDigit) + static_cast<float>(first);
        sums[t][r] += half_at(weights + kDOffset + 2 * r) * products;
        sums[t][r] += half_at(weights + kMOffset + 2 * r) * x.group_sums[t * x.groups + g];
      }
    }
  }
}
#endif

template <int T, typename out_t>
void multiply_pass(const Digits& x, const float* scales, const uint8_t* packed, const out_t* residual, out_t* out,
                   int64_t out_features) {
  // 8 row blocks (128 output rows, 40 KB at 576 inputs) a task.
  at::parallel_for(0, out_features / kRowsPerBlock, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      float sums[T][kRowsPerBlock];
      accumulate_block<T>(x, packed + block * x.groups * kBlockBytes, sums);
      for (int t = 0; t < T; ++t) {
        out_t* target = out + t * out_features + block * kRowsPerBlock;
        const out_t* add = residual == nullptr ? nullptr : residual + t * out_features + block * kRowsPerBlock;
        for (int r = 0; r < kRowsPerBlock; ++r) {
          const float value = sums[t][r] * scales[t];
          target[r] = narrow<out_t>(add == nullptr ? value : value + pdserve_native::widen(add[r]));
        }
      }
    }
  });
}

template <typename scalar_t>
void run(const scalar_t* x, const uint8_t* packed, const scalar_t* residual, scalar_t* out, int64_t num_rows,
         int64_t in_features, int64_t out_features) {
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
      digit_sums[t * groups + g] = static_cast<float>(first) + static_cast<float>(second) / kSecondDigit;
    }
  }
  for (int64_t start = 0; start < num_rows; start += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, num_rows - start);
    const Digits pass{digits.data() + start * in_features, num_rows * in_features, digit_sums.data() + start * groups,
                      in_features, groups};
    const float* pass_scales = scales.data() + start;
    const scalar_t* pass_residual = residual == nullptr ? nullptr : residual + start * out_features;
    scalar_t* pass_out = out + start * out_features;
    switch (rows) {
      case 1: multiply_pass<1>(pass, pass_scales, packed, pass_residual, pass_out, out_features); break;
      case 2: multiply_pass<2>(pass, pass_scales, packed, pass_residual, pass_out, out_features); break;
      case 3: multiply_pass<3>(pass, pass_scales, packed, pass_residual, pass_out, out_features); break;
      default: multiply_pass<4>(pass, pass_scales, packed, pass_residual, pass_out, out_features);
    }
  }
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

// packed: as int4_linear's. Returns the float32 weights [out, in] it holds, d * q + m: for batches
// large enough that a float GEMM beats the int4 kernel, dequantized for that call (1 ms for
// gate_up, 3072 x 576, against ~17 ms for the same unpacking in torch ops).
at::Tensor int4_dequantize(const at::Tensor& packed) {
  TORCH_CHECK(packed.device().is_cpu(), "int4_dequantize runs on the CPU");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.size(2) == kBlockBytes,
              "packed must be a contiguous uint8 [out / 16, in / 32, 320]");
  const int64_t blocks = packed.size(0), groups = packed.size(1), in_features = groups * kGroup;
  at::Tensor out = at::empty({blocks * kRowsPerBlock, in_features}, packed.options().dtype(at::kFloat));
  const uint8_t* source = packed.data_ptr<uint8_t>();
  float* target = out.data_ptr<float>();
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* weights = source + (block * groups + g) * kBlockBytes;
        for (int r = 0; r < kRowsPerBlock; ++r) {
          const float d = half_at(weights + kDOffset + 2 * r), m = half_at(weights + kMOffset + 2 * r);
          float* row = target + (block * kRowsPerBlock + r) * in_features + g * kGroup;
          for (int c = 0; c < 4; ++c) {
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = weights[64 * c + 4 * r + i];
              row[8 * c + i] = d * static_cast<float>(byte & 0x0F) + m;
              row[8 * c + 4 + i] = d * static_cast<float>(byte >> 4) + m;
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor? residual) -> Tensor");
  m.def("int4_dequantize(Tensor packed) -> Tensor");
  m.def("int4_linear_path() -> str", [] { return std::string(kPath); });  // no tensor argument: one kernel for all
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_dequantize", &int4_dequantize);
}
