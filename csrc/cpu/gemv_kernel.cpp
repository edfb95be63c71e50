// The GEMV tile kernel (gemv_kernel.h): AVX-512, AVX2 and scalar forms.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see epilogues_avx512.cpp)
#endif

#include "gemv_kernel.h"

#include "simd_loads.h"

namespace vqkernels::cpu {
namespace {

// out[j * ldt + c] for codes j < m (rows + j * ldr, D elements) and packed inputs c < nc (xs + c * Dp, fp32).
template <typename T>
void gemv_scalar(const T* rows, int64_t ldr, int64_t D, int64_t m, const float* xs, int64_t Dp, int64_t nc,
                 float* out, int64_t ldt, double* sq) {
  for (int64_t j = 0; j < m; ++j) {
    const T* cr = rows + j * ldr;
    if (sq != nullptr) {
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<double>(cr[d]) * static_cast<double>(cr[d]);
      sq[j] = s;
    }
    for (int64_t c = 0; c < nc; ++c) {
      const float* xr = xs + c * Dp;
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += static_cast<float>(cr[d]) * xr[d];
      out[j * ldt + c] = s;
    }
  }
}

#ifdef VQK_X86
// G input rows at a time (accumulators in registers), the code's chunk loaded once for all of them; with SQ also
// the code's fp64 sum of squares, in the order of row_norms.cpp's AVX-512 form (so either pass gives the same key
// terms).
template <int G, bool SQ, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void gemv_group_avx512(
    const T* cr, int64_t D, const float* xs, int64_t Dp, float* o, double* sq) {
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (int64_t d = 0; d < D; d += 16) {
    const int64_t n = D - d < 16 ? D - d : 16;
    const __m512 cv = load16(cr + d, static_cast<__mmask16>((1u << n) - 1u));
    for (int g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(cv, _mm512_loadu_ps(xs + g * Dp + d), acc[g]);
    if constexpr (SQ) {
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(cv));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(cv), 1)));
      s0 = _mm512_fmadd_pd(lo, lo, s0);
      s1 = _mm512_fmadd_pd(hi, hi, s1);
    }
  }
  for (int g = 0; g < G; ++g) o[g] = _mm512_reduce_add_ps(acc[g]);
  if constexpr (SQ) *sq = hsum_pd(_mm512_add_pd(s0, s1));
}

// Horizontal sums of 4 vectors at once (one shuffle tree for the 4 instead of one per vector), in the association
// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) for fp64, which hsum_pd below repeats for one vector.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m128 hsum4_ps(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));  // [a b c d] per 128 bits
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256d hsum4_pd(__m512d a, __m512d b, __m512d c,
                                                                             __m512d d) {
  const __m512d ab = _mm512_add_pd(_mm512_unpacklo_pd(a, b), _mm512_unpackhi_pd(a, b));  // pairs (0+1), (2+3), ...
  const __m512d cd = _mm512_add_pd(_mm512_unpacklo_pd(c, d), _mm512_unpackhi_pd(c, d));
  const __m512d ab2 = _mm512_add_pd(ab, _mm512_permutex_pd(ab, _MM_SHUFFLE(1, 0, 3, 2)));  // (01 + 23) per half
  const __m512d cd2 = _mm512_add_pd(cd, _mm512_permutex_pd(cd, _MM_SHUFFLE(1, 0, 3, 2)));
  // lanes 0, 1 (and 4, 5) of ab2 hold a, b; of cd2 c, d: pack [a b c d] of each half, then add the halves
  const __m512d abcd = _mm512_mask_blend_pd(0xCC, ab2, _mm512_permutex_pd(cd2, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_add_pd(_mm512_castpd512_pd256(abcd), _mm512_extractf64x4_pd(abcd, 1));
}

// One input row (nc = 1) with the squares: 4 codes at a time, so that their sums share the shuffle trees.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemv1_sq_avx512(const T* rows, int64_t ldr, int64_t D,
                                                                           int64_t m, const float* x, float* out,
                                                                           int64_t ldt, double* sq) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    __m512 acc[4];
    __m512d s0[4], s1[4];
    for (int g = 0; g < 4; ++g) {
      acc[g] = _mm512_setzero_ps();
      s0[g] = s1[g] = _mm512_setzero_pd();
    }
    for (int64_t d = 0; d < D; d += 16) {
      const int64_t n = D - d < 16 ? D - d : 16;
      const __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
      const __m512 xv = _mm512_loadu_ps(x + d);
      for (int g = 0; g < 4; ++g) {
        const __m512 cv = load16(rows + (j + g) * ldr + d, k);
        acc[g] = _mm512_fmadd_ps(cv, xv, acc[g]);
        const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(cv));
        const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(cv), 1)));
        s0[g] = _mm512_fmadd_pd(lo, lo, s0[g]);
        s1[g] = _mm512_fmadd_pd(hi, hi, s1[g]);
      }
    }
    alignas(16) float dots[4];
    _mm_store_ps(dots, hsum4_ps(acc[0], acc[1], acc[2], acc[3]));
    for (int g = 0; g < 4; ++g) out[(j + g) * ldt] = dots[g];
    _mm256_storeu_pd(sq + j, hsum4_pd(_mm512_add_pd(s0[0], s1[0]), _mm512_add_pd(s0[1], s1[1]),
                                      _mm512_add_pd(s0[2], s1[2]), _mm512_add_pd(s0[3], s1[3])));
  }
  for (; j < m; ++j) gemv_group_avx512<1, true>(rows + j * ldr, D, x, 0, out + j * ldt, sq + j);
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemv_avx512(const T* rows, int64_t ldr, int64_t D,
                                                                       int64_t m, const float* xs, int64_t Dp,
                                                                       int64_t nc, float* out, int64_t ldt,
                                                                       double* sq) {
  if (nc == 1 && sq != nullptr) return gemv1_sq_avx512(rows, ldr, D, m, xs, out, ldt, sq);
  for (int64_t j = 0; j < m; ++j) {
    const T* cr = rows + j * ldr;
    float* o = out + j * ldt;
    int64_t c = 0;
    if (sq != nullptr) {  // the code's squares with its first group of inputs
      if (nc >= 4) {
        gemv_group_avx512<4, true>(cr, D, xs, Dp, o, sq + j);
        c = 4;
      } else {
        gemv_group_avx512<1, true>(cr, D, xs, Dp, o, sq + j);
        c = 1;
      }
    }
    for (; c + 4 <= nc; c += 4) gemv_group_avx512<4, false>(cr, D, xs + c * Dp, Dp, o + c, nullptr);
    for (; c < nc; ++c) gemv_group_avx512<1, false>(cr, D, xs + c * Dp, Dp, o + c, nullptr);
  }
}

template <int G, bool SQ, typename T>
__attribute__((target("avx2,fma,f16c"))) inline void gemv_group_avx2(const T* cr, int64_t D, const float* xs,
                                                                     int64_t Dp, float* o, double* sq) {
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 cv = load8(cr + d, D - d < 8 ? D - d : 8);
    for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(cv, _mm256_loadu_ps(xs + g * Dp + d), acc[g]);
    if constexpr (SQ) {
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(cv));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(cv, 1));
      s0 = _mm256_fmadd_pd(lo, lo, s0);
      s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    o[g] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
  if constexpr (SQ) {
    const __m256d t = _mm256_add_pd(s0, s1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    *sq = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) void gemv_avx2(const T* rows, int64_t ldr, int64_t D, int64_t m,
                                                         const float* xs, int64_t Dp, int64_t nc, float* out,
                                                         int64_t ldt, double* sq) {
  for (int64_t j = 0; j < m; ++j) {
    const T* cr = rows + j * ldr;
    float* o = out + j * ldt;
    int64_t c = 0;
    if (sq != nullptr) {
      if (nc >= 4) {
        gemv_group_avx2<4, true>(cr, D, xs, Dp, o, sq + j);
        c = 4;
      } else {
        gemv_group_avx2<1, true>(cr, D, xs, Dp, o, sq + j);
        c = 1;
      }
    }
    for (; c + 4 <= nc; c += 4) gemv_group_avx2<4, false>(cr, D, xs + c * Dp, Dp, o + c, nullptr);
    for (; c < nc; ++c) gemv_group_avx2<1, false>(cr, D, xs + c * Dp, Dp, o + c, nullptr);
  }
}
#endif

}  // namespace

template <typename scalar_t>
void GemvTile<scalar_t>::load_cols(Scratch& s, int64_t c0, int64_t nc) const {
  const int64_t D = cols_.D;
  s.nc = nc;
  s.xs.assign(size_t(nc) * Dp_, 0.0f);
  for (int64_t c = 0; c < nc; ++c) {
    const scalar_t* src = cols_.row(c0 + c);
    for (int64_t d = 0; d < D; ++d) s.xs[c * Dp_ + d] = static_cast<float>(src[d]);
  }
}

template <typename scalar_t>
void GemvTile<scalar_t>::tile_norms(Scratch& s, int64_t r0, int64_t m, int64_t nc, float* out, int64_t ldt,
                                    double* sq) const {
  const scalar_t* rows = rows_.row(r0);
#ifdef VQK_X86
  if (isa_ == EpilogueKind::Avx512)
    return gemv_avx512(rows, rows_.ld, rows_.D, m, s.xs.data(), Dp_, nc, out, ldt, sq);
  if (isa_ == EpilogueKind::Avx2) return gemv_avx2(rows, rows_.ld, rows_.D, m, s.xs.data(), Dp_, nc, out, ldt, sq);
#endif
  gemv_scalar(rows, rows_.ld, rows_.D, m, s.xs.data(), Dp_, nc, out, ldt, sq);
}

template class GemvTile<float>;
template class GemvTile<at::BFloat16>;
template class GemvTile<at::Half>;

}  // namespace vqkernels::cpu
