// The two ends of an int8 x int8 linear layer (layers/w8a8.py), for native_kernels.py: rows of
// activations quantized to int8 before torch._int_mm, and its int32 sums scaled back after it.
// In torch each end is five or six ops over the whole batch; a decode step runs 121 such layers.
//
// Arithmetic (layers/w8a8.py's torch functions compute the same):
//   quantize:   one or two int8 digits a value (int8_digits.h, shared with int4_linear.cpp).
//   dequantize: out = (sum1 [+ sum2 / 254]) * row_scale * column_scale (+ residual), float32,
//               rounded once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "bf16.h"
#include "isa.h"
#include "int8_digits.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;
using pdserve_native::kSecondDigit;
using pdserve_native::quantize;

#ifdef __AVX512F__
using pdserve_native::widen16;

inline void store16(float* target, __m512 values) { _mm512_storeu_ps(target, values); }

inline void store16(c10::BFloat16* target, __m512 values) {
#ifdef __AVX512BF16__
  // Round to nearest even, as c10::BFloat16's conversion does.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(target), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(values)));
#else
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, values);
  for (int i = 0; i < 16; ++i) target[i] = narrow<c10::BFloat16>(lanes[i]);
#endif
}

inline __m512 widen16(const int32_t* sums) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(sums)); }
#endif

// x: [rows, width] float32 or bfloat16, rows any stride apart; digits: 1 or 2. Returns
// (q [digits * rows, width] int8, scales [rows] float32).
std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x, int64_t digits) {
  TORCH_CHECK(x.device().is_cpu(), "quantize_rows_int8 runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, width] with contiguous rows");
  TORCH_CHECK(digits == 1 || digits == 2, "digits must be 1 or 2");
  at::Tensor q = at::empty({digits * x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto run = [&](auto* data) {
    auto quantize_digits = digits == 1 ? quantize<1, std::remove_pointer_t<decltype(data)>>
                                       : quantize<2, std::remove_pointer_t<decltype(data)>>;
    quantize_digits(data, x.stride(0), q.data_ptr<int8_t>(), scales.data_ptr<float>(), x.size(0), x.size(1));
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
    run(x.data_ptr<float>());
  }
  return {q, scales};
}

template <typename out_t>
void rescale(const int32_t* sums, const float* row_scales, const float* column_scales, const out_t* residual,
             out_t* out, int64_t num_rows, int64_t width, int64_t digits) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = sums + r * width;
      const int32_t* second = sums + (num_rows + r) * width;
      const float row_scale = row_scales[r];
      out_t* target = out + r * width;
      const out_t* add = residual == nullptr ? nullptr : residual + r * width;
      int64_t i = 0;
#ifdef __AVX512F__
      const __m512 row_scales16 = _mm512_set1_ps(row_scale);
      for (; i + 16 <= width; i += 16) {
        __m512 sum = widen16(row + i);
        if (digits == 2) sum = _mm512_add_ps(sum, _mm512_div_ps(widen16(second + i), _mm512_set1_ps(kSecondDigit)));
        __m512 value = _mm512_mul_ps(_mm512_mul_ps(sum, row_scales16), _mm512_loadu_ps(column_scales + i));
        if (add != nullptr) value = _mm512_add_ps(value, widen16(add + i));
        store16(target + i, value);
      }
#endif
      for (; i < width; ++i) {  // the tail, or every column without AVX-512
        float sum = static_cast<float>(row[i]);
        if (digits == 2) sum += static_cast<float>(second[i]) / kSecondDigit;
        float value = sum * row_scale * column_scales[i];
        if (add != nullptr) value += widen(add[i]);
        target[i] = narrow<out_t>(value);
      }
    }
  });
}

// sums: contiguous [digits * rows, width] int32 (torch._int_mm's output, second digits' rows
// last); row_scales [rows] and column_scales [width] float32; residual: None or a contiguous
// [rows, width] of ``dtype``. Returns [rows, width] of ``dtype`` (float32 or bfloat16).
at::Tensor dequantize_int32(const at::Tensor& sums, const at::Tensor& row_scales, const at::Tensor& column_scales,
                            const std::optional<at::Tensor>& residual, at::ScalarType dtype, int64_t digits) {
  TORCH_CHECK(sums.device().is_cpu(), "dequantize_int32 runs on the CPU");
  TORCH_CHECK(digits == 1 || digits == 2, "digits must be 1 or 2");
  TORCH_CHECK(sums.dim() == 2 && sums.is_contiguous() && sums.scalar_type() == at::kInt && sums.size(0) % digits == 0,
              "sums must be a contiguous int32 [digits * rows, width]");
  const int64_t num_rows = sums.size(0) / digits, width = sums.size(1);
  TORCH_CHECK(row_scales.dim() == 1 && row_scales.is_contiguous() && row_scales.scalar_type() == at::kFloat &&
                  row_scales.size(0) == num_rows,
              "row_scales must be a contiguous float32 [rows]");
  TORCH_CHECK(column_scales.dim() == 1 && column_scales.is_contiguous() &&
                  column_scales.scalar_type() == at::kFloat && column_scales.size(0) == width,
              "column_scales must be a contiguous float32 [width]");
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "dtype must be float32 or bfloat16");
  if (residual.has_value()) {
    TORCH_CHECK(residual->is_contiguous() && residual->scalar_type() == dtype && residual->dim() == 2 &&
                    residual->size(0) == num_rows && residual->size(1) == width,
                "residual must be a contiguous [rows, width] of dtype");
  }
  at::Tensor out = at::empty({num_rows, width}, sums.options().dtype(dtype));
  if (dtype == at::kBFloat16) {
    rescale(sums.data_ptr<int32_t>(), row_scales.data_ptr<float>(), column_scales.data_ptr<float>(),
            residual.has_value() ? residual->data_ptr<c10::BFloat16>() : nullptr, out.data_ptr<c10::BFloat16>(),
            num_rows, width, digits);
  } else {
    rescale(sums.data_ptr<int32_t>(), row_scales.data_ptr<float>(), column_scales.data_ptr<float>(),
            residual.has_value() ? residual->data_ptr<float>() : nullptr, out.data_ptr<float>(), num_rows, width,
            digits);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def("quantize_rows_int8(Tensor x, int digits) -> (Tensor, Tensor)");
  m.def("dequantize_int32(Tensor sums, Tensor row_scales, Tensor column_scales, Tensor? residual, "
        "ScalarType dtype, int digits) -> Tensor");
  m.def("int8_rows_path() -> str", [] { return std::string(pdserve_native::kIsa); });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8);
  m.impl("dequantize_int32", &dequantize_int32);
}
