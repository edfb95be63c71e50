// Loads of 16 (AVX-512) or 8 (AVX2) elements of a row as fp32, whatever its storage type: fp32 as is, bf16 as
// the high half of a float (exact), fp16 through the hardware conversion (exact). Short tails read no further
// than the row. For the kernels that convert on the fly (row_norms.cpp, gemv_kernel.cpp); each function carries
// the target of the kernels that inline it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "cpu_features.h"

#ifdef VQK_X86
#include <immintrin.h>

namespace vqkernels::cpu {
namespace {

// 16 elements as fp32 (bf16: the high half of a float; fp16: vcvtph2ps), n < 16 masked with zeros.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const float* p, __mmask16 k) {
  return _mm512_maskz_loadu_ps(k, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

// The sum of 8 doubles in the association ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): every fp64 sum of
// squares of the AVX-512 kernels ends so, whichever kernel computed it (row_norms.cpp, gemv_kernel.cpp).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline double hsum_pd(__m512d v) {
  const __m512d p = _mm512_add_pd(v, _mm512_permute_pd(v, 0x55));                       // (0+1), (2+3), ...
  const __m512d q = _mm512_add_pd(p, _mm512_permutex_pd(p, _MM_SHUFFLE(1, 0, 3, 2)));  // (01+23), (45+67)
  return _mm_cvtsd_f64(_mm512_castpd512_pd128(q)) + _mm_cvtsd_f64(_mm256_castpd256_pd128(_mm512_extractf64x4_pd(q, 1)));
}

// 8 elements as fp32, n < 8 copied through a zeroed buffer (AVX2 has no masked 16-bit loads).
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float* p, int64_t n) {
  if (n == 8) return _mm256_loadu_ps(p);
  alignas(32) float b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(b, p, sizeof(float) * n);
  return _mm256_load_ps(b);
}
__attribute__((target("avx2,fma,f16c"))) inline __m128i load8_u16(const void* p, int64_t n) {
  if (n == 8) return _mm_loadu_si128(static_cast<const __m128i*>(p));
  alignas(16) uint16_t b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(b, p, 2 * n);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(b));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::BFloat16* p, int64_t n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8_u16(p, n)), 16));
}
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const at::Half* p, int64_t n) {
  return _mm256_cvtph_ps(load8_u16(p, n));
}

}  // namespace
}  // namespace vqkernels::cpu
#endif  // VQK_X86
