// The instruction-set level a kernel is compiled for, and the namespace its ops register in.
//
// native_kernels.py builds every source once per level (cpu_features.py: avx512, avx2,
// portable), each with that level's compiler flags and -DPDSERVE_OPS=pdserve_<level>, so the
// builds of one source register the same ops side by side (torch.ops.pdserve_avx2.rms_norm,
// torch.ops.pdserve_portable.rms_norm) and a test can run every level this CPU has.
// Each source also registers ``<source>_path() -> str``: the path its ops take in this build,
// which the engine logs and ``pdserve env`` prints.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // declares every level's intrinsics; each is usable where its flag is on
#endif

#ifndef PDSERVE_OPS
#define PDSERVE_OPS pdserve
#endif

namespace pdserve_native {

#if defined(__AVX512F__)
inline constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
inline constexpr const char* kIsa = "avx2";
#else
inline constexpr const char* kIsa = "portable";
#endif

}  // namespace pdserve_native
