// AVX-512 forms of the fp32 epilogues (epilogues.h), called only where cpu_features() reports AVX-512: the
// sampling epilogue (written here with target attributes) and the search epilogues (epilogue_kernels.h compiled
// for AVX-512 at the end of the file).

// GCC 12's intrinsic headers build their "undefined" vectors by self-initialisation (`__m512 __Y = __Y;`), which
// -Wmaybe-uninitialized reports wherever such an intrinsic is inlined: a false positive, silenced before any
// header (the warning is located in the intrinsic headers, so the pragma must precede them).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "epilogues.h"

#ifdef VQK_X86
#include <immintrin.h>

namespace vqkernels::cpu {

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

// ---- the search epilogues: epilogue_kernels.h on 16 lanes ---------------------------------------------------------
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512cd,avx512bw,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512cd,avx512bw,avx512vl,avx2,fma")
#endif

#include "epilogue_kernels.h"

namespace vqkernels::cpu {
namespace {

struct Avx512 {
  using T = float;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int L = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1i(int32_t v) { return _mm512_set1_epi32(v); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F sel(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static I seli(M m, I a, I b) { return _mm512_mask_blend_epi32(m, b, a); }
  static bool any(M m) { return m != 0; }
};

}  // namespace

void argmin_codes_avx512(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                         int32_t kb, float* best, int32_t* bidx) {
  epilogue::argmin_codes<Avx512>(tile, nb, ld, m, w, o, kb, best, bidx);
}

void top4_codes_avx512(const float* tile, int64_t nb, int64_t ld, int64_t m, const float* w, const float* o,
                       int32_t kb, float* topv, int32_t* topi, int64_t stride) {
  epilogue::top4_codes<Avx512>(tile, nb, ld, m, w, o, kb, topv, topi, stride);
}

}  // namespace vqkernels::cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // VQK_X86
