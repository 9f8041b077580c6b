// Decode attention read straight from the paged KV cache (CPU), for native_kernels.py.
//
// One query token per sequence attends over its cached context, block by block through its
// block table: no gathered copy of the context, one pass over the keys and one over the values.
// Every (sequence, KV head) pair is one task; the query heads of a KV head's group share each key
// and value read (GQA). Scores, softmax and sums are float32; the cache is float32 or bfloat16,
// widened on the fly (a bfloat16 is the top half of a float32).
//
// Queries are read where they lie (a token's heads contiguous, tokens any stride apart: the fused
// QKV projection's rows) and the result is written in float32 or in the cache's dtype, into a
// fresh tensor or into the caller's (the ``_into`` variant), so a decode step copies neither.
//
// Built with -O3 -ffast-math -fopenmp: the loops over the head dimension and over positions
// vectorize (reductions reassociated, exp through the vector math library). The head dimension
// is a template parameter for the common sizes, so those loops have fixed trip counts.
//
// A bf16 cache with 64 or 128-wide heads on a CPU with AVX512-BF16 (the default CPU path) takes
// hand-vectorized loops instead: scores by the bf16 dot-product instruction, 16 positions' sums
// reduced together rather than one horizontal sum each, and the weighted sum of the values kept
// in registers for GQA groups of up to 4 heads. The same products, summed in another order. On
// the 2-core Xeon (30 layers' caches, cold, 512-token contexts, 2 threads) a layer's call took
// 1.93-1.98 -> 1.07-1.15 ms at batch 32 and 421-425 -> 254-270 us at batch 8.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "isa.h"

namespace {

using pdserve_native::narrow;
using pdserve_native::widen;

struct Geometry {
  int64_t num_seqs, num_heads, num_kv_heads, block_size, max_blocks;
  float scale;
};

// Calls visit(position, row) for positions 0 .. length - 1 of one sequence, row pointing at the
// KV head's vector in the cache; positions of a block are position_stride apart.
template <typename cache_t, typename Visit>
inline void for_each_position(const cache_t* cache, const int64_t* table, int64_t length, int64_t head_offset,
                              int64_t block_size, int64_t position_stride, Visit visit) {
  const int64_t block_stride = block_size * position_stride;
  for (int64_t start = 0; start < length; start += block_size) {
    const cache_t* row = cache + table[start / block_size] * block_stride + head_offset;
    const int64_t count = std::min(block_size, length - start);
    // The next block is anywhere in the pool: ask for its first rows while this one is read.
    if (start + block_size < length) {
      const cache_t* next = cache + table[start / block_size + 1] * block_stride + head_offset;
      for (int64_t offset = 0; offset < std::min<int64_t>(4, block_size); ++offset) {
        __builtin_prefetch(next + offset * position_stride);
      }
    }
    // Rows of a block are position_stride apart, other heads' rows between them: prefetch a few
    // rows ahead (at batch 8 on one core, the kernel's time fell 21%, 772 -> 609 us a layer).
    for (int64_t offset = 0; offset < count; ++offset, row += position_stride) {
      if (offset + 4 < count) __builtin_prefetch(row + 4 * position_stride);
      visit(start + offset, row);
    }
  }
}

#if defined(__AVX512BF16__)
// Lane p of the result is the sum of v[p]'s 16 lanes: 16 horizontal sums for the price of about
// three shuffles and adds each, where one at a time costs about ten.
inline __m512 sum_lanes_16(const __m512* v) {
  __m512 pairs[8];  // blocks of 4 lanes: v[2i]'s two half sums, then v[2i+1]'s
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  __m512 quads[4];  // block k of quads[j]: four partial sums of v[4j + k]
  for (int j = 0; j < 4; ++j) {
    quads[j] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * j], pairs[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(pairs[2 * j], pairs[2 * j + 1], 0xDD));
  }
  const __m512 low = _mm512_add_ps(_mm512_unpacklo_ps(quads[0], quads[1]), _mm512_unpackhi_ps(quads[0], quads[1]));
  const __m512 high = _mm512_add_ps(_mm512_unpacklo_ps(quads[2], quads[3]), _mm512_unpackhi_ps(quads[2], quads[3]));
  const __m512 sums = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(low), _mm512_castps_pd(high))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(low), _mm512_castps_pd(high))));
  // Lane 4k + j of sums holds v[4j + k]'s total.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, sums);
}

// The scores of a GQA group's queries (bf16, contiguous) over one sequence's keys in a bf16
// cache, 16 positions at a time: the bf16 dot-product instruction multiplies exactly and sums in
// float32, and the 16 positions' sums are reduced together (sum_lanes_16).
template <int kHeadDim>
void bf16_scores(const c10::BFloat16* queries, int64_t group, const c10::BFloat16* k_cache, const int64_t* table,
                 int64_t length, int64_t head_offset, int64_t block_size, int64_t position_stride, float scale,
                 float* scores) {
  constexpr int kChunks = kHeadDim / 32;  // 32 bf16 a register
  const int64_t block_stride = block_size * position_stride;
  // Rows [first, first + count) of the sequence, walking the block table (no division a row).
  auto find_rows = [&](int64_t first, int count, const c10::BFloat16** rows) {
    if (count == 0) return;  // past the end: the table has no entry to read
    int64_t block = first / block_size, offset = first % block_size;
    const c10::BFloat16* block_start = k_cache + table[block] * block_stride + head_offset;
    for (int i = 0; i < count; ++i) {
      rows[i] = block_start + offset * position_stride;
      if (++offset == block_size && i + 1 < count) {
        offset = 0;
        block_start = k_cache + table[++block] * block_stride + head_offset;
      }
    }
  };
  const __m512 scales = _mm512_set1_ps(scale);
  const c10::BFloat16* rows[16];
  const c10::BFloat16* next_rows[16];
  find_rows(0, static_cast<int>(std::min<int64_t>(16, length)), rows);
  for (int64_t start = 0; start < length; start += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, length - start));
    // The next 16 rows may lie in another block anywhere in the pool: ask for them now.
    const int next_count = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, length - start - 16)));
    find_rows(start + 16, next_count, next_rows);
    for (int i = 0; i < next_count; ++i) {
      for (int line = 0; line < kHeadDim * 2; line += 64) __builtin_prefetch(reinterpret_cast<const char*>(next_rows[i]) + line);
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512bh q[kChunks];
      for (int c = 0; c < kChunks; ++c) q[c] = (__m512bh)_mm512_loadu_si512(queries + g * kHeadDim + c * 32);
      __m512 partial[16];
      for (int i = 0; i < count; ++i) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < kChunks; ++c) acc = _mm512_dpbf16_ps(acc, q[c], (__m512bh)_mm512_loadu_si512(rows[i] + c * 32));
        partial[i] = acc;
      }
      for (int i = count; i < 16; ++i) partial[i] = _mm512_setzero_ps();
      const __m512 sums = _mm512_mul_ps(sum_lanes_16(partial), scales);
      _mm512_mask_storeu_ps(scores + g * length + start, static_cast<__mmask16>((1u << count) - 1), sums);
    }
    std::copy(next_rows, next_rows + next_count, rows);
  }
}

// The group's weighted sums of the values (bf16 cache), accumulated in registers: kGroup query
// heads x kHeadDim float32 lanes stay in registers across the positions instead of being loaded
// and stored back for every position.
template <int kHeadDim, int kGroup>
void bf16_weighted_values(const float* weights, int64_t length, const c10::BFloat16* v_cache, const int64_t* table,
                          int64_t head_offset, int64_t block_size, int64_t position_stride, float* acc) {
  constexpr int kVectors = kHeadDim / 16;  // 16 float32 a register
  __m512 sums[kGroup][kVectors];
  for (int g = 0; g < kGroup; ++g)
    for (int c = 0; c < kVectors; ++c) sums[g][c] = _mm512_setzero_ps();
  const int64_t block_stride = block_size * position_stride;
  for (int64_t start = 0; start < length; start += block_size) {
    const c10::BFloat16* row = v_cache + table[start / block_size] * block_stride + head_offset;
    const int64_t count = std::min(block_size, length - start);
    if (start + block_size < length) {
      const char* next = reinterpret_cast<const char*>(v_cache + table[start / block_size + 1] * block_stride + head_offset);
      for (int64_t offset = 0; offset < std::min<int64_t>(4, block_size); ++offset)
        for (int line = 0; line < kHeadDim * 2; line += 64) __builtin_prefetch(next + offset * position_stride * 2 + line);
    }
    for (int64_t offset = 0; offset < count; ++offset, row += position_stride) {
      if (offset + 4 < count) __builtin_prefetch(row + 4 * position_stride);
      __m512 values[kVectors];
      for (int c = 0; c < kVectors; ++c) values[c] = pdserve_native::widen16(row + c * 16);
      const int64_t pos = start + offset;
      for (int g = 0; g < kGroup; ++g) {
        const __m512 weight = _mm512_set1_ps(weights[g * length + pos]);
        for (int c = 0; c < kVectors; ++c) sums[g][c] = _mm512_fmadd_ps(weight, values[c], sums[g][c]);
      }
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int c = 0; c < kVectors; ++c) _mm512_storeu_ps(acc + g * kHeadDim + c * 16, sums[g][c]);
}
#endif

// kHeadDim > 0: a compile-time head dimension; 0: use head_dim. q: token t's heads start at
// q + t * q_stride; out: [num_seqs, num_heads, head_dim] contiguous.
template <int kHeadDim, typename cache_t, typename out_t>
void attend(const cache_t* q, int64_t q_stride, const cache_t* k_cache, const cache_t* v_cache,
            const int64_t* block_tables, const int64_t* context_lens, out_t* out, const Geometry& geo,
            int64_t runtime_head_dim) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
  const int64_t group = geo.num_heads / geo.num_kv_heads;
  // The cache is [num_blocks, block_size, num_kv_heads, head_dim].
  const int64_t position_stride = geo.num_kv_heads * head_dim;

  at::parallel_for(0, geo.num_seqs * geo.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * head_dim);
    std::vector<float> row(head_dim);
    std::vector<float> inverse_sums(group);
    std::vector<float> query_rows(group * head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / geo.num_kv_heads;
      const int64_t kv_head = task % geo.num_kv_heads;
      const int64_t length = context_lens[seq];
      const int64_t* table = block_tables + seq * geo.max_blocks;
      // The group's queries, widened once: every position reads them all.
      const cache_t* group_queries = q + seq * q_stride + kv_head * group * head_dim;
      for (int64_t i = 0; i < group * head_dim; ++i) query_rows[i] = widen(group_queries[i]);
      const float* queries = query_rows.data();
      scores.resize(group * length);

      // Scores.
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<cache_t, c10::BFloat16> && (kHeadDim == 64 || kHeadDim == 128)) {
        bf16_scores<kHeadDim>(group_queries, group, k_cache, table, length, kv_head * head_dim, geo.block_size,
                              position_stride, geo.scale, scores.data());
      } else
#endif
      for_each_position(k_cache, table, length, kv_head * head_dim, geo.block_size, position_stride,
                        [&](int64_t pos, const cache_t* k) {
#pragma omp simd
                          for (int64_t d = 0; d < head_dim; ++d) row[d] = widen(k[d]);
                          for (int64_t g = 0; g < group; ++g) {
                            const float* qg = queries + g * head_dim;
                            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
                            scores[g * length + pos] = dot * geo.scale;
                          }
                        });

      // Softmax per query head (normalized at the end).
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        // -ffast-math assumes no infinities: start from the lowest finite float.
        float peak = std::numeric_limits<float>::lowest();
        for (int64_t pos = 0; pos < length; ++pos) peak = std::max(peak, s[pos]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t pos = 0; pos < length; ++pos) {
          s[pos] = std::exp(s[pos] - peak);
          sum += s[pos];
        }
        inverse_sums[g] = 1.0f / sum;
      }

      // Weighted sum of the values.
      std::fill(acc.begin(), acc.end(), 0.0f);
      bool summed = false;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<cache_t, c10::BFloat16> && (kHeadDim == 64 || kHeadDim == 128)) {
        if (group <= 4) {
          auto weighted = group == 1   ? bf16_weighted_values<kHeadDim, 1>
                          : group == 2 ? bf16_weighted_values<kHeadDim, 2>
                          : group == 3 ? bf16_weighted_values<kHeadDim, 3>
                                       : bf16_weighted_values<kHeadDim, 4>;
          weighted(scores.data(), length, v_cache, table, kv_head * head_dim, geo.block_size, position_stride,
                   acc.data());
          summed = true;
        }
      }
#endif
      if (!summed) {
        for_each_position(v_cache, table, length, kv_head * head_dim, geo.block_size, position_stride,
                          [&](int64_t pos, const cache_t* v) {
#pragma omp simd
                            for (int64_t d = 0; d < head_dim; ++d) row[d] = widen(v[d]);
                            for (int64_t g = 0; g < group; ++g) {
                              const float weight = scores[g * length + pos];
                              float* a = acc.data() + g * head_dim;
#pragma omp simd
                              for (int64_t d = 0; d < head_dim; ++d) a[d] += weight * row[d];
                            }
                          });
      }
      for (int64_t g = 0; g < group; ++g) {
        out_t* o = out + (seq * geo.num_heads + kv_head * group + g) * head_dim;
        const float* a = acc.data() + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = narrow<out_t>(a[d] * inverse_sums[g]);
      }
    }
  });
}

template <typename cache_t, typename out_t>
void dispatch_head_dim(const cache_t* q, int64_t q_stride, const cache_t* k, const cache_t* v, const int64_t* tables,
                       const int64_t* lengths, out_t* out, const Geometry& geo, int64_t head_dim) {
  switch (head_dim) {
    case 64: return attend<64>(q, q_stride, k, v, tables, lengths, out, geo, head_dim);
    case 128: return attend<128>(q, q_stride, k, v, tables, lengths, out, geo, head_dim);
    default: return attend<0>(q, q_stride, k, v, tables, lengths, out, geo, head_dim);
  }
}

// q: [num_seqs, num_heads, head_dim] (heads contiguous; any stride between sequences); caches:
// [num_blocks, block_size, num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks] int64;
// context_lens: [num_seqs] int64, each in [1, max_blocks * block_size]; out: contiguous
// [num_seqs, num_heads, head_dim], float32 or the cache's dtype.
void paged_decode_attention_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                 const at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && out.device().is_cpu(),
              "paged_decode_attention runs on the CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q must be [seqs, heads, head_dim] and the caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the K and V caches differ in dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block tables and context lengths must be int64");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2), num_blocks = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0,
              "the query heads do not match the cache's KV heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs && context_lens.dim() == 1 &&
                  context_lens.size(0) == num_seqs,
              "one block table row and one context length per sequence");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == num_seqs && out.size(1) == num_heads &&
                  out.size(2) == head_dim,
              "out must be a contiguous [seqs, heads, head_dim]");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == k_cache.scalar_type(),
              "out must be float32 or the cache's dtype");
  // Heads contiguous within a token; a query in another dtype than the cache is converted (tests).
  at::Tensor queries = q.to(k_cache.scalar_type());
  if (queries.stride(2) != 1 || queries.stride(1) != head_dim) queries = queries.contiguous();
  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor lengths = context_lens.contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t* lengths_data = lengths.data_ptr<int64_t>();
  const int64_t* tables_data = tables.data_ptr<int64_t>();
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t length = lengths_data[seq];
    TORCH_CHECK(length >= 1 && length <= max_blocks * block_size, "a context length is outside its block table");
    for (int64_t b = 0; b < (length + block_size - 1) / block_size; ++b) {
      const int64_t block = tables_data[seq * max_blocks + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "a block table names a block outside the cache");
    }
  }
  const Geometry geo{num_seqs, num_heads, num_kv_heads, block_size, max_blocks, static_cast<float>(scale)};
  const int64_t q_stride = queries.stride(0);
  if (k_cache.scalar_type() == at::kBFloat16) {
    using bf16 = c10::BFloat16;
    const bf16* qd = queries.data_ptr<bf16>();
    const bf16* kd = k_cache.data_ptr<bf16>();
    const bf16* vd = v_cache.data_ptr<bf16>();
    if (out.scalar_type() == at::kFloat) {
      dispatch_head_dim(qd, q_stride, kd, vd, tables_data, lengths_data, out.data_ptr<float>(), geo, head_dim);
    } else {
      dispatch_head_dim(qd, q_stride, kd, vd, tables_data, lengths_data, out.data_ptr<bf16>(), geo, head_dim);
    }
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "the cache must be float32 or bfloat16");
    dispatch_head_dim(queries.data_ptr<float>(), q_stride, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                      tables_data, lengths_data, out.data_ptr<float>(), geo, head_dim);
  }
}

// As paged_decode_attention_into, into a new float32 tensor.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [seqs, heads, head_dim]");
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  paged_decode_attention_into(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(PDSERVE_OPS, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def(
      "paged_decode_attention_into(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor(a!) out) -> ()");
  m.def("paged_decode_attention_path() -> str", [] {
#if defined(__AVX512BF16__)
    return std::string("avx512, bf16 dot products for bf16 caches");
#else
    return std::string(pdserve_native::kIsa);
#endif
  });
}

TORCH_LIBRARY_IMPL(PDSERVE_OPS, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_attention_into", &paged_decode_attention_into);
}
