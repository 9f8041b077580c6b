// The two ends of an int8 x int8 linear layer (w8a8_linear.py), for native_kernels.py: rows of
// activations quantized to int8 before torch._int_mm, and its int32 sums scaled back after it.
// In torch each end is five or six ops over the whole batch; a decode step runs 121 such layers.
//
// Arithmetic (w8a8_linear.py's torch functions compute the same):
//   quantize:   scale = max|row| / 127; q = round_half_even(x * (127 / max|row|)), in [-127, 127];
//               an all-zero row gets scale 0 and q = 0.
//   dequantize: out = sum * row_scale * column_scale (+ residual), float32, rounded once.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "bf16.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

constexpr float kInt8Max = 127.0f;

template <typename scalar_t>
void quantize(const scalar_t* x, int64_t x_stride, int8_t* q, float* scales, int64_t num_rows, int64_t width) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * x_stride;
      float max_abs = 0.0f;
      for (int64_t i = 0; i < width; ++i) max_abs = std::max(max_abs, std::fabs(widen(row[i])));
      // In double, rounded once to float: -ffast-math may turn a division into a product by a
      // reciprocal, which in float can miss the correctly rounded quotient torch computes.
      const float inverse = max_abs > 0.0f ? static_cast<float>(127.0 / static_cast<double>(max_abs)) : 0.0f;
      int8_t* target = q + r * width;
      for (int64_t i = 0; i < width; ++i) {
        // nearbyint rounds half to even in the default rounding mode, as torch.round does.
        const float value = std::nearbyint(widen(row[i]) * inverse);
        target[i] = static_cast<int8_t>(std::min(kInt8Max, std::max(-kInt8Max, value)));
      }
      scales[r] = static_cast<float>(static_cast<double>(max_abs) / 127.0);
    }
  });
}

// x: [rows, width] float32 or bfloat16, rows any stride apart. Returns (q [rows, width] int8,
// scales [rows] float32).
std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "quantize_rows_int8 runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, width] with contiguous rows");
  at::Tensor q = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {
    quantize(x.data_ptr<c10::BFloat16>(), x.stride(0), q.data_ptr<int8_t>(), scales.data_ptr<float>(), x.size(0),
             x.size(1));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
    quantize(x.data_ptr<float>(), x.stride(0), q.data_ptr<int8_t>(), scales.data_ptr<float>(), x.size(0), x.size(1));
  }
  return {q, scales};
}

template <typename out_t>
void rescale(const int32_t* sums, const float* row_scales, const float* column_scales, const out_t* residual,
             out_t* out, int64_t num_rows, int64_t width) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = sums + r * width;
      const float row_scale = row_scales[r];
      out_t* target = out + r * width;
      if (residual == nullptr) {
        for (int64_t i = 0; i < width; ++i)
          target[i] = narrow<out_t>(static_cast<float>(row[i]) * row_scale * column_scales[i]);
      } else {
        const out_t* add = residual + r * width;
        for (int64_t i = 0; i < width; ++i)
          target[i] = narrow<out_t>(static_cast<float>(row[i]) * row_scale * column_scales[i] + widen(add[i]));
      }
    }
  });
}

// sums: contiguous [rows, width] int32 (torch._int_mm's output); row_scales [rows] and
// column_scales [width] float32; residual: None or a contiguous [rows, width] of ``dtype``.
// Returns [rows, width] of ``dtype`` (float32 or bfloat16).
at::Tensor dequantize_int32(const at::Tensor& sums, const at::Tensor& row_scales, const at::Tensor& column_scales,
                            const std::optional<at::Tensor>& residual, at::ScalarType dtype) {
  TORCH_CHECK(sums.device().is_cpu(), "dequantize_int32 runs on the CPU");
  TORCH_CHECK(sums.dim() == 2 && sums.is_contiguous() && sums.scalar_type() == at::kInt,
              "sums must be a contiguous int32 [rows, width]");
  const int64_t num_rows = sums.size(0), width = sums.size(1);
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
            num_rows, width);
  } else {
    rescale(sums.data_ptr<int32_t>(), row_scales.data_ptr<float>(), column_scales.data_ptr<float>(),
            residual.has_value() ? residual->data_ptr<float>() : nullptr, out.data_ptr<float>(), num_rows, width);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("quantize_rows_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("dequantize_int32(Tensor sums, Tensor row_scales, Tensor column_scales, Tensor? residual, "
        "ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("quantize_rows_int8", &quantize_rows_int8);
  m.impl("dequantize_int32", &dequantize_int32);
}
