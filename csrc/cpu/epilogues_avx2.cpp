// The search epilogues on AVX2 + FMA (8 lanes): epilogue_kernels.h compiled for that ISA, called only where
// cpu_features() reports it (CPUs without AVX-512: many laptops and AMD servers).
#include <cstdint>

#include "../numerics.h"
#include "cpu_features.h"

#ifdef VQK_X86
#include <immintrin.h>

// Everything below compiles for AVX2 + FMA; what has external linkage above is included before this point.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "epilogue_kernels.h"

namespace vqkernels::cpu {
namespace {

struct Avx2 {
  using T = float;
  using F = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones / all-zeros lanes
  static constexpr int L = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storei(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1i(int32_t v) { return _mm256_set1_epi32(v); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F sel(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static I seli(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
};

}  // namespace

void argmin_codes_avx2(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* best, int32_t* bidx) {
  epilogue::argmin_codes<Avx2>(tile, nb, ld, m, w, o, kb, best, bidx);
}

void top4_codes_avx2(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                     int32_t kb, float* topv, int32_t* topi, int64_t stride) {
  epilogue::top4_codes<Avx2>(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

}  // namespace vqkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VQK_X86
