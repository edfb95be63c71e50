// The GEMV tile kernel (gemv_kernel.h): AVX-512, AVX2 and scalar forms.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see epilogues_avx512.cpp)
#endif

#include "gemv_kernel.h"

#include "row_norms.h"
#include "simd_loads.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

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
// ---- bf16 inputs on AVX512-BF16: vdpbf16ps ------------------------------------------------------------------
// Each code is read as stored, 32 bf16 at a time, and meets the input rows (packed in bf16, zero-padded to a
// multiple of 32) through vdpbf16ps: the products of two bf16 are exact in fp32, their sums accumulate in fp32
// like the GEMM tiles' (README "Method" §1.1). The code's sum of squares comes from the same instruction (c . c in
// fp32) instead of an fp64 sum of squares: 2 instructions per 32 elements instead of 8 conversions and 4 fp64
// FMAs, which is what makes a one-row pass over a huge codebook a pure memory stream. Its error (a few fp32 ulps of
// |c|^2) is inside what the fast keys already carry and what exact mode's bound allows (numerics.h: gamma covers
// D + 4 fp32 roundings of cmax^2). A sum that overflows fp32 (|c| >= 2^64) or meets a NaN / Inf is redone in fp64
// by the caller, so the non-finite check stays exact.

// Lanes [0, n) of a 32-lane bf16 chunk.
inline __mmask32 tail32(int64_t n) { return n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u); }

// One code against one input row (and its squares with SQ): the tails of the 4-wide forms below. Every sum goes
// through hsum4_ps, as theirs do, so a dot product's bits do not depend on the form its code or row lands in (tile
// and split boundaries follow the thread count).
template <bool SQ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void gemv1_bf16dot(const at::BFloat16* cr,
                                                                                          int64_t D,
                                                                                          const at::BFloat16* x,
                                                                                          float* o, float* sq) {
  __m512 acc = _mm512_setzero_ps(), ss = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __m512bh cv = (__m512bh)_mm512_maskz_loadu_epi16(tail32(D - d), cr + d);
    acc = _mm512_dpbf16_ps(acc, cv, (__m512bh)_mm512_loadu_si512(x + d));
    if constexpr (SQ) ss = _mm512_dpbf16_ps(ss, cv, cv);
  }
  alignas(16) float r[4];
  _mm_store_ps(r, hsum4_ps(acc, ss, acc, acc));
  *o = r[0];
  if constexpr (SQ) *sq = r[1];
}

// One input row with the squares, 4 codes at a time (their 8 sums share two shuffle trees).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv1_sq_bf16dot(
    const at::BFloat16* rows, int64_t ldr, int64_t D, int64_t m, const at::BFloat16* x, float* out, int64_t ldt,
    float* sq) {
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    __m512 acc[4], ss[4];
    for (int g = 0; g < 4; ++g) acc[g] = ss[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 k = tail32(D - d);
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + d);
      for (int g = 0; g < 4; ++g) {
        const __m512bh cv = (__m512bh)_mm512_maskz_loadu_epi16(k, rows + (j + g) * ldr + d);
        acc[g] = _mm512_dpbf16_ps(acc[g], cv, xv);
        ss[g] = _mm512_dpbf16_ps(ss[g], cv, cv);
      }
    }
    alignas(16) float dots[4];
    _mm_store_ps(dots, hsum4_ps(acc[0], acc[1], acc[2], acc[3]));
    for (int g = 0; g < 4; ++g) out[(j + g) * ldt] = dots[g];
    _mm_storeu_ps(sq + j, hsum4_ps(ss[0], ss[1], ss[2], ss[3]));
  }
  for (; j < m; ++j) gemv1_bf16dot<true>(rows + j * ldr, D, x, out + j * ldt, sq + j);
}

// 4 codes x 4 input rows: each chunk of a code and of a row loaded once for 4 products; the 16 dot products
// reduced by 4 shuffle trees, each giving one code's 4 rows, stored side by side (out[j * ldt + c .. c + 3]). The
// 20 accumulators are named one by one: GCC keeps an array of them on the stack, storing it every iteration.
template <bool SQ>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void gemv4x4_bf16dot(
    const at::BFloat16* cr, int64_t ldr, int64_t D, const at::BFloat16* xs, int64_t Dp, float* o, int64_t ldt,
    float* sq) {
#define VQK_ACC4(g) __m512 a##g##0 = _mm512_setzero_ps(), a##g##1 = a##g##0, a##g##2 = a##g##0, a##g##3 = a##g##0
  VQK_ACC4(0);
  VQK_ACC4(1);
  VQK_ACC4(2);
  VQK_ACC4(3);
#undef VQK_ACC4
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask32 k = tail32(D - d);
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xs + d);
    const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xs + Dp + d);
    const __m512bh x2 = (__m512bh)_mm512_loadu_si512(xs + 2 * Dp + d);
    const __m512bh x3 = (__m512bh)_mm512_loadu_si512(xs + 3 * Dp + d);
#define VQK_CODE4(g)                                                                  \
  {                                                                                   \
    const __m512bh cv = (__m512bh)_mm512_maskz_loadu_epi16(k, cr + g * ldr + d);      \
    a##g##0 = _mm512_dpbf16_ps(a##g##0, cv, x0);                                      \
    a##g##1 = _mm512_dpbf16_ps(a##g##1, cv, x1);                                      \
    a##g##2 = _mm512_dpbf16_ps(a##g##2, cv, x2);                                      \
    a##g##3 = _mm512_dpbf16_ps(a##g##3, cv, x3);                                      \
    if constexpr (SQ) s##g = _mm512_dpbf16_ps(s##g, cv, cv);                          \
  }
    VQK_CODE4(0)
    VQK_CODE4(1)
    VQK_CODE4(2)
    VQK_CODE4(3)
#undef VQK_CODE4
  }
  _mm_storeu_ps(o, hsum4_ps(a00, a01, a02, a03));
  _mm_storeu_ps(o + ldt, hsum4_ps(a10, a11, a12, a13));
  _mm_storeu_ps(o + 2 * ldt, hsum4_ps(a20, a21, a22, a23));
  _mm_storeu_ps(o + 3 * ldt, hsum4_ps(a30, a31, a32, a33));
  if constexpr (SQ) _mm_storeu_ps(sq, hsum4_ps(s0, s1, s2, s3));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv_bf16dot(
    const at::BFloat16* rows, int64_t ldr, int64_t D, int64_t m, const at::BFloat16* xs, int64_t Dp, int64_t nc,
    float* out, int64_t ldt, float* sq) {
  if (nc == 1 && sq != nullptr) return gemv1_sq_bf16dot(rows, ldr, D, m, xs, out, ldt, sq);
  int64_t j = 0;
  if (nc >= 4) {
    for (; j + 4 <= m; j += 4) {
      const at::BFloat16* cr = rows + j * ldr;
      float* o = out + j * ldt;
      int64_t c = 0;
      if (sq != nullptr) {
        gemv4x4_bf16dot<true>(cr, ldr, D, xs, Dp, o, ldt, sq + j);
        c = 4;
      }
      for (; c + 4 <= nc; c += 4) gemv4x4_bf16dot<false>(cr, ldr, D, xs + c * Dp, Dp, o + c, ldt, nullptr);
      for (; c < nc; ++c)
        for (int g = 0; g < 4; ++g)
          gemv1_bf16dot<false>(cr + g * ldr, D, xs + c * Dp, o + g * ldt + c, nullptr);
    }
  }
  for (; j < m; ++j) {  // the last m % 4 codes, or every code of a block of 2 or 3 rows
    const at::BFloat16* cr = rows + j * ldr;
    float* o = out + j * ldt;
    int64_t c = 0;
    if (sq != nullptr) {
      gemv1_bf16dot<true>(cr, D, xs, o, sq + j);
      c = 1;
    }
    for (; c < nc; ++c) gemv1_bf16dot<false>(cr, D, xs + c * Dp, o + c, nullptr);
  }
}
#endif

}  // namespace

template <typename scalar_t>
void GemvTile<scalar_t>::load_cols(Scratch& s, int64_t c0, int64_t nc) const {
  const int64_t D = cols_.D;
  s.nc = nc;
  if (bf16dot_) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      s.xb.assign(size_t(nc) * Dp_, at::BFloat16(0.0f));
      for (int64_t c = 0; c < nc; ++c) std::copy(cols_.row(c0 + c), cols_.row(c0 + c) + D, s.xb.begin() + c * Dp_);
    }
    return;
  }
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
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16dot_) {
      s.sq32.resize(size_t(m));
      const bool fp32_sq = sq != nullptr && !fp64_squares_;
      gemv_bf16dot(rows, rows_.ld, rows_.D, m, s.xb.data(), Dp_, nc, out, ldt, fp32_sq ? s.sq32.data() : nullptr);
      // exact mode re-scores with the norms: the fp64 sums, from the tile's codes while they are in cache
      if (sq != nullptr && fp64_squares_) sum_squares_rows(rows_, r0, r0 + m, sq);
      if (fp32_sq) {
        for (int64_t j = 0; j < m; ++j) {
          // overflow of fp32 (finite codes of norm >= 2^64) or a NaN / Inf: the fp64 sum decides
          if (std::isfinite(s.sq32[j])) {
            sq[j] = s.sq32[j];
          } else {
            sum_squares_rows(rows_, r0 + j, r0 + j + 1, sq + j);
          }
        }
      }
      return;
    }
  }
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
