// Rotary position embedding of the new tokens' queries and keys, in place in the fused QKV
// projection's output, and the new keys and values stored into their paged-cache slots: one
// call per layer for what eager torch does in about eight (a concatenation, a negation, two
// products and a sum for the rotation; two index copies for the cache). At decode batch sizes
// each of those costs more in dispatch than in arithmetic. For native_kernels.py.
//
// The rotation is Llama's "rotate half": for i < D/2, with c = cos[t, i], s = sin[t, i],
//   x'[i] = x[i] * c - x[i + D/2] * s,   x'[i + D/2] = x[i + D/2] * c + x[i] * s
// (cos and sin repeat their first half in the second, as the engine builds them). Arithmetic is
// float32 whatever the storage; a bfloat16 result is rounded once, to nearest even.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "isa.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

template <typename scalar_t>
void rotate_and_store(scalar_t* qkv, const float* cos, const float* sin, const int64_t* slots, scalar_t* k_cache,
                      scalar_t* v_cache, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim) {
  const int64_t half = head_dim / 2;
  const int64_t row = (num_heads + 2 * num_kv_heads) * head_dim;  // one token of the QKV output
  const int64_t kv_row = num_kv_heads * head_dim;                   // one token of a cache
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* token = qkv + t * row;
      const float* c = cos + t * head_dim;
      const float* s = sin + t * head_dim;
      // Queries and keys are contiguous heads at the start of the row.
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        scalar_t* head = token + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) x[d] = widen(head[d]);
        for (int64_t d = 0; d < half; ++d) {
          head[d] = narrow<scalar_t>(x[d] * c[d] - x[d + half] * s[d]);
          head[d + half] = narrow<scalar_t>(x[d + half] * c[d + half] + x[d] * s[d + half]);
        }
      }
      const int64_t slot = slots[t];
      std::memcpy(k_cache + slot * kv_row, token + num_heads * head_dim, kv_row * sizeof(scalar_t));
      std::memcpy(v_cache + slot * kv_row, token + (num_heads + num_kv_heads) * head_dim, kv_row * sizeof(scalar_t));
    }
  });
}

// qkv: [T, (num_heads + 2 * num_kv_heads) * head_dim], rotated in place; cos, sin: [T, head_dim]
// float32; slots: [T] int64 flat cache slots; caches: [num_blocks, block_size, num_kv_heads,
// head_dim] of qkv's dtype (float32 or bfloat16).
void rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                   const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t num_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "rope_write_kv runs on the CPU");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "the caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "qkv and the caches must share a dtype");
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  TORCH_CHECK(head_dim % 2 == 0 && num_heads > 0, "rotary embedding needs an even head dimension");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qkv must be a contiguous [tokens, (heads + 2 * kv_heads) * head_dim]");
  const int64_t num_tokens = qkv.size(0);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() &&
                  cos.size(0) == num_tokens && cos.size(1) == head_dim,
              "cos and sin must be contiguous float32 [tokens, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == num_tokens &&
                  slots.is_contiguous(),
              "slots must be int64, one per token");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slot_data = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slot_data[t] >= 0 && slot_data[t] < num_slots, "a slot is outside the cache");
  }
  if (qkv.scalar_type() == at::kBFloat16) {
    rotate_and_store(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), slot_data,
                     k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), num_tokens, num_heads,
                     num_kv_heads, head_dim);
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kFloat, "qkv must be float32 or bfloat16");
    rotate_and_store(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), slot_data,
                     k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), num_tokens, num_heads, num_kv_heads,
                     head_dim);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def(
      "rope_write_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, int num_heads) -> ()");
  m.def("rope_write_kv_path() -> str", [] { return std::string(pdserve_native::kIsa); });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) { m.impl("rope_write_kv", &rope_write_kv); }
