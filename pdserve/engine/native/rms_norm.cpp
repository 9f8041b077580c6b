// RMSNorm of each row in one call, for native_kernels.py. Eager torch runs a bfloat16
// ``F.rms_norm`` as about seven ops (widen, square, mean, add, rsqrt, two products, narrow);
// at decode batch sizes their dispatch costs far more than the arithmetic: 61 norms were
// 4.6 ms of a 35 ms batch-1 step (benchmarks/profile_decode.py).
//
// Arithmetic follows Hugging Face's LlamaRMSNorm: float32 mean of squares, x * rsqrt(mean + eps)
// rounded to the storage dtype, then multiplied by the weight and rounded again.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "isa.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

template <typename scalar_t>
void normalize_rows(const scalar_t* x, int64_t x_stride, const scalar_t* weight, scalar_t* out, int64_t num_rows,
                    int64_t width, float eps) {
  // A row is ~1 us of work: small batches stay on the calling thread instead of waking the team.
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * x_stride;
      float sum_of_squares = 0.0f;
      for (int64_t i = 0; i < width; ++i) {
        const float value = widen(row[i]);
        sum_of_squares += value * value;
      }
      const float inverse_rms = 1.0f / std::sqrt(sum_of_squares / static_cast<float>(width) + eps);
      scalar_t* target = out + r * width;
      for (int64_t i = 0; i < width; ++i) {
        const float normalized = widen(narrow<scalar_t>(widen(row[i]) * inverse_rms));
        target[i] = narrow<scalar_t>(widen(weight[i]) * normalized);
      }
    }
  });
}

// x: [rows, width] float32 or bfloat16, rows any stride apart; weight: [width] of x's dtype.
// Returns a contiguous [rows, width] of x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, width] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "weight must be a contiguous [width]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  TORCH_CHECK(eps >= 0.0, "eps must be >= 0");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    normalize_rows(x.data_ptr<c10::BFloat16>(), x.stride(0), weight.data_ptr<c10::BFloat16>(),
                   out.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32 or bfloat16");
    normalize_rows(x.data_ptr<float>(), x.stride(0), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0),
                   x.size(1), static_cast<float>(eps));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_path() -> str", [] { return std::string(pdserve_native::kIsa); });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) { m.impl("rms_norm", &rms_norm); }
