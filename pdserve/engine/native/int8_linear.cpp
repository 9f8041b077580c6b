// x @ W.T for a few rows of x against int8 weights with one scale per output row, for
// native_kernels.py. Decoding is bound by reading weights, and the LM head is the largest matrix
// of a small model (SmolLM2-135M: 49,152 x 576, a fifth of its weights): at one byte a weight it
// reads half of what bf16 reads. torch's _weight_int8pack_mm reached only ~10 GB/s on it here,
// no faster than the packed bf16 head; this kernel streams each weight row once for all rows of
// x, widening int8 to float32 on the fly, and runs at memory speed.
//
// Arithmetic: float32 products and sums; out = scale[o] * sum_i q[o, i] * x[t, i], rounded once
// to the output dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "bf16.h"
#include "isa.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

constexpr int64_t kMaxRows = 4;  // rows of x a weight row is read for at once
constexpr int64_t kRowBlock = 4;  // weight rows summed side by side: independent accumulators

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float sum8(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
#endif

// out[t, o] for o in [begin, end): T rows of x (float32, widened) against int8 rows of weight.
template <int T, typename out_t>
void multiply_rows(const float* xs, const int8_t* weight, const float* scales, out_t* out, int64_t in_features,
                   int64_t out_features, int64_t begin, int64_t end) {
  int64_t o = begin;
#ifdef __AVX512F__
  if (in_features % 16 == 0) {
    for (; o + kRowBlock <= end; o += kRowBlock) {
      __m512 acc[kRowBlock][T];
      for (int r = 0; r < kRowBlock; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
      for (int64_t i = 0; i < in_features; i += 16) {
        // The row block after next, one cache line a step: it is read as one contiguous run
        // (its rows lie back to back), so the 36 steps of a 576-wide block cover it. Without
        // this the kernel read at ~10 GB/s; with it, the LM head (49,152 x 576, cold) took
        // 1.39-1.53 ms at one row against 2.25-2.43, and 1.59-1.70 against 2.85-3.42 at four
        // (2 threads; a prefetch past the end of the weights is harmless).
        _mm_prefetch(reinterpret_cast<const char*>(weight + (o + 2 * kRowBlock) * in_features + i * kRowBlock),
                     _MM_HINT_T0);
        __m512 w[kRowBlock];
        for (int r = 0; r < kRowBlock; ++r) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + (o + r) * in_features + i));
          w[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        }
        for (int t = 0; t < T; ++t) {
          const __m512 x = _mm512_loadu_ps(xs + t * in_features + i);
          for (int r = 0; r < kRowBlock; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], x, acc[r][t]);
        }
      }
      for (int r = 0; r < kRowBlock; ++r)
        for (int t = 0; t < T; ++t)
          out[t * out_features + o + r] = narrow<out_t>(_mm512_reduce_add_ps(acc[r][t]) * scales[o + r]);
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (in_features % 8 == 0) {  // as above, 8 inputs a step
    for (; o + kRowBlock <= end; o += kRowBlock) {
      __m256 acc[kRowBlock][T];
      for (int r = 0; r < kRowBlock; ++r)
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
      for (int64_t i = 0; i < in_features; i += 8) {
        // The row block after next, as above; at 8 inputs a step, each line is asked for twice.
        _mm_prefetch(reinterpret_cast<const char*>(weight + (o + 2 * kRowBlock) * in_features + i * kRowBlock),
                     _MM_HINT_T0);
        __m256 w[kRowBlock];
        for (int r = 0; r < kRowBlock; ++r) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(weight + (o + r) * in_features + i));
          w[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        }
        for (int t = 0; t < T; ++t) {
          const __m256 x = _mm256_loadu_ps(xs + t * in_features + i);
          for (int r = 0; r < kRowBlock; ++r) acc[r][t] = _mm256_fmadd_ps(w[r], x, acc[r][t]);
        }
      }
      for (int r = 0; r < kRowBlock; ++r)
        for (int t = 0; t < T; ++t) out[t * out_features + o + r] = narrow<out_t>(sum8(acc[r][t]) * scales[o + r]);
    }
  }
#endif
  for (; o < end; ++o) {  // the rows left over, or every row on the portable path
    const int8_t* w = weight + o * in_features;
    for (int t = 0; t < T; ++t) {
      const float* x = xs + t * in_features;
      float sum = 0.0f;
      for (int64_t i = 0; i < in_features; ++i) sum += static_cast<float>(w[i]) * x[i];
      out[t * out_features + o] = narrow<out_t>(sum * scales[o]);
    }
  }
}

template <int T, typename in_t>
void multiply(const in_t* x, const int8_t* weight, const float* scales, float* out, int64_t in_features,
              int64_t out_features) {
  // x widened once: every weight row reads all of it.
  std::vector<float> wide(T * in_features);
  for (int64_t i = 0; i < T * in_features; ++i) wide[i] = widen(x[i]);
  // 256 weight rows (144 KB at 576 inputs) a task: enough to amortize waking the team.
  at::parallel_for(0, out_features, 256, [&](int64_t begin, int64_t end) {
    multiply_rows<T>(wide.data(), weight, scales, out, in_features, out_features, begin, end);
  });
}

template <typename in_t>
void dispatch_rows(int64_t num_rows, const in_t* x, const int8_t* weight, const float* scales, float* out,
                   int64_t in_features, int64_t out_features) {
  switch (num_rows) {
    case 1: return multiply<1>(x, weight, scales, out, in_features, out_features);
    case 2: return multiply<2>(x, weight, scales, out, in_features, out_features);
    case 3: return multiply<3>(x, weight, scales, out, in_features, out_features);
    default: return multiply<4>(x, weight, scales, out, in_features, out_features);
  }
}

// x: contiguous [rows <= 4, in] float32 or bfloat16; weight: contiguous [out, in] int8; scales:
// [out] float32. Returns [rows, out] float32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && scales.device().is_cpu(),
              "int8_linear runs on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar,
              "weight must be a contiguous int8 [out, in]");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == in_features,
              "x must be a contiguous [rows, in] matching the weight");
  TORCH_CHECK(x.size(0) <= kMaxRows, "int8_linear takes at most 4 rows of x");
  TORCH_CHECK(scales.dim() == 1 && scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  scales.size(0) == out_features,
              "scales must be a contiguous float32 [out]");
  at::Tensor out = at::empty({x.size(0), out_features}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return out;
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_rows(x.size(0), x.data_ptr<c10::BFloat16>(), weight.data_ptr<int8_t>(), scales.data_ptr<float>(),
                  out.data_ptr<float>(), in_features, out_features);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
    dispatch_rows(x.size(0), x.data_ptr<float>(), weight.data_ptr<int8_t>(), scales.data_ptr<float>(),
                  out.data_ptr<float>(), in_features, out_features);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("int8_linear_path() -> str", [] { return std::string(pdserve_native::kIsa); });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) { m.impl("int8_linear", &int8_linear); }
