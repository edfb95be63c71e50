// AVX-512 forms of the fp32 epilogues (epilogues.h), compiled for AVX-512 by target attributes and called only
// after the run-time checks of isa.h.

// GCC 12's intrinsic headers build their "undefined" vectors by self-initialisation (`__m512 __Y = __Y;`), which
// -Wmaybe-uninitialized reports wherever such an intrinsic is inlined: a false positive, silenced before any
// header (the warning is located in the intrinsic headers, so the pragma must precede them).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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

namespace {

__attribute__((target("avx512f"))) inline __m512i mix32_avx512(__m512i v) {
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 17));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0xED5AD4BBu)));
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 11));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0xAC4C1B51u)));
  v = _mm512_xor_si512(v, _mm512_srli_epi32(v, 15));
  v = _mm512_mullo_epi32(v, _mm512_set1_epi32(static_cast<int>(0x31848BABu)));
  return _mm512_xor_si512(v, _mm512_srli_epi32(v, 14));
}

}  // namespace

// sample_tile_scalar's arithmetic 16 columns at a time (the same fma keys, the same two prunes, bit for bit); the
// lanes that survive both prunes are finished one by one in column order, so ties still go to the lowest row.
__attribute__((target("avx512f,avx512cd"))) void sample_tile_avx512(
    const float* tile, int64_t m, int64_t nb, int64_t ld, const float* w, const float* o, const uint32_t* rkey,
    int64_t c0, const float* rs, const float* rt, const uint32_t* qkey, bool clamp, float* best, int64_t* bidx) {
  const SampleBounds<float>& bounds = SampleBounds<float>::get();
  const __m512 gmax = _mm512_set1_ps(bounds.gmax);
  const __m512 bmax_lo = _mm512_loadu_ps(bounds.bucket_max);
  const __m512 bmax_hi = _mm512_loadu_ps(bounds.bucket_max + 16);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i mant = _mm512_set1_epi32(0x7FFFFF);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i c31 = _mm512_set1_epi32(31);
  alignas(64) float keys[16];
  alignas(64) uint32_t hashes[16];
  for (int64_t r = 0; r < m; ++r) {
    const float* t = tile + r * ld;
    const __m512 sv = _mm512_set1_ps(rs[r]), av = _mm512_set1_ps(rt[r]);
    const __m512i qv = _mm512_set1_epi32(static_cast<int>(qkey[r]));
    float b = best[r];
    int64_t bi = bidx[r];
    __m512 bv = _mm512_set1_ps(b);
    for (int64_t j = 0; j < nb; j += 16) {
      const __mmask16 in = nb - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (nb - j)) - 1u);
      __m512 key = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, t + j), _mm512_maskz_loadu_ps(in, w + j),
                                   _mm512_maskz_loadu_ps(in, o + j));
      key = _mm512_fmadd_ps(key, sv, av);
      if (clamp) key = _mm512_max_ps(zero, key);  // NaN stays NaN (the second operand on unordered)
      __mmask16 live = _mm512_mask_cmp_ps_mask(in, _mm512_sub_ps(key, gmax), bv, _CMP_LT_OQ);
      if (live == 0) continue;
      const __m512i h = mix32_avx512(_mm512_xor_si512(_mm512_maskz_loadu_epi32(in, rkey + j), qv));
      const __m512i v = _mm512_or_si512(_mm512_sub_epi32(mant, _mm512_srli_epi32(h, 9)), one);
      const __m512i bucket = _mm512_sub_epi32(c31, _mm512_lzcnt_epi32(v));
      const __m512 bmax = _mm512_permutex2var_ps(bmax_lo, bucket, bmax_hi);
      live = _mm512_mask_cmp_ps_mask(live, _mm512_sub_ps(key, bmax), bv, _CMP_LT_OQ);
      if (live == 0) continue;
      _mm512_store_ps(keys, key);
      _mm512_store_si512(hashes, h);
      while (live != 0) {
        const int l = __builtin_ctz(live);
        live = static_cast<__mmask16>(live & (live - 1));
        const float val = keys[l] - num::gumbel_from_hash<float>(hashes[l]);
        if (val < b) {
          b = val;
          bi = c0 + j + l;
        }
      }
      bv = _mm512_set1_ps(b);
    }
    best[r] = b;
    bidx[r] = bi;
  }
}

}  // namespace vqkernels::cpu
#endif
