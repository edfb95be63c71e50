// AVX-512 forms of the fp32 epilogues (epilogues.h), compiled for AVX-512 by target attributes and called only
// after the run-time checks of isa.h.
#include "epilogues.h"

#ifdef VQK_X86
#include <immintrin.h>

namespace vqkernels::cpu {

__attribute__((target("avx512f"))) void argmin_tile_avx512(const float* tile, int64_t m, int64_t nb, int64_t ld,
                                                            const float* w, const float* o, int64_t kb,
                                                            float* best, int64_t* bidx) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const int64_t nfull = nb & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (nb - nfull)) - 1u);
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tile + r * ld;
    __m512 mv = inf;
    __m512i iv = _mm512_setzero_si512();
    __m512i jv = lane;
    for (int64_t j = 0; j < nfull; j += 16) {
      const __m512 key = _mm512_fmadd_ps(_mm512_loadu_ps(t + j), _mm512_loadu_ps(w + j), _mm512_loadu_ps(o + j));
      const __mmask16 lt = _mm512_cmp_ps_mask(key, mv, _CMP_LT_OQ);
      mv = _mm512_mask_mov_ps(mv, lt, key);
      iv = _mm512_mask_mov_epi32(iv, lt, jv);
      jv = _mm512_add_epi32(jv, step);
    }
    if (tail) {
      const __m512 key = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, t + nfull), _mm512_maskz_loadu_ps(tail, w + nfull),
                                         _mm512_maskz_loadu_ps(tail, o + nfull));
      const __mmask16 lt = _mm512_mask_cmp_ps_mask(tail, key, mv, _CMP_LT_OQ);
      mv = _mm512_mask_mov_ps(mv, lt, key);
      iv = _mm512_mask_mov_epi32(iv, lt, jv);
    }
    const float mn = _mm512_reduce_min_ps(mv);
    if (mn < best[r]) {
      // Each lane holds the first index of its own minimum; the lowest index among the minimal lanes wins.
      const __mmask16 eq = _mm512_cmp_ps_mask(mv, _mm512_set1_ps(mn), _CMP_EQ_OQ);
      best[r] = mn;
      bidx[r] = kb + _mm512_mask_reduce_min_epi32(eq, iv);
    }
  }
}

}  // namespace vqkernels::cpu
#endif
