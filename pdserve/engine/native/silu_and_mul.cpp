// SwiGLU's activation in one call, for native_kernels.py: silu(gate) * up from the fused
// gate/up projection's output. Eager torch needs a split, a silu and a product, each a
// dispatch and a fresh tensor; at decode batch sizes that costs more than the arithmetic.
//
// Rounding follows Hugging Face's bfloat16 LlamaMLP: silu(gate) is rounded to the storage dtype,
// then the product is rounded again.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "isa.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

template <typename scalar_t>
void activate_rows(const scalar_t* gate_up, scalar_t* out, int64_t num_rows, int64_t width) {
  // ~16k elements a task: a decode batch (a few rows of 1,536) stays on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / width);
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = gate_up + r * 2 * width;
      const scalar_t* up = gate + width;
      scalar_t* target = out + r * width;
      for (int64_t i = 0; i < width; ++i) {
        const float g = widen(gate[i]);
        const float activated = widen(narrow<scalar_t>(g / (1.0f + std::exp(-g))));
        target[i] = narrow<scalar_t>(activated * widen(up[i]));
      }
    }
  });
}

// gate_up: contiguous [rows, 2 * width], gate first; returns [rows, width] of its dtype.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_and_mul runs on the CPU");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous [rows, 2 * width]");
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), width}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    activate_rows(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), gate_up.size(0), width);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "gate_up must be float32 or bfloat16");
    activate_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), gate_up.size(0), width);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("silu_and_mul_path() -> str", [] { return std::string(pdserve_native::kIsa); });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) { m.impl("silu_and_mul", &silu_and_mul); }
