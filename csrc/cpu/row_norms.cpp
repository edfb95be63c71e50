// Sums of squares of rows in fp64 (row_norms.h): scalar, AVX2 and AVX-512 forms, chosen by cpu_features().
//
// For fp32 / bf16 / fp16 a non-finite element makes the fp64 sum non-finite and nothing else can (a finite fp32
// square is below 2^256, far from fp64's overflow), so the check is one test of the sum; fp64 rows test every
// element (x^2 of a finite fp64 may overflow).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 headers (see epilogues_avx512.cpp)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "row_norms.h"

#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "simd_loads.h"

namespace vqkernels::cpu {
namespace {

template <typename scalar_t>
double sum_squares_scalar(const scalar_t* v, int64_t D) {
  double s = 0.0;
  for (int64_t j = 0; j < D; ++j) {
    const double a = static_cast<double>(v[j]);
    s += a * a;
  }
  return s;
}

bool all_finite(const double* v, int64_t D) {
  for (int64_t j = 0; j < D; ++j)
    if (!std::isfinite(v[j])) return false;
  return true;
}

#ifdef VQK_X86
template <typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl"))) double sum_squares_avx512(const scalar_t* v, int64_t D) {
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  for (int64_t j = 0; j < D; j += 16) {
    const int64_t n = D - j < 16 ? D - j : 16;
    const __m512 f = load16(v + j, static_cast<__mmask16>((1u << n) - 1u));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
    a0 = _mm512_fmadd_pd(lo, lo, a0);
    a1 = _mm512_fmadd_pd(hi, hi, a1);
  }
  return hsum_pd(_mm512_add_pd(a0, a1));
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) double sum_squares_avx2(const scalar_t* v, int64_t D) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (int64_t j = 0; j < D; j += 8) {
    const __m256 f = load8(v + j, D - j < 8 ? D - j : 8);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
    a0 = _mm256_fmadd_pd(lo, lo, a0);
    a1 = _mm256_fmadd_pd(hi, hi, a1);
  }
  const __m256d s = _mm256_add_pd(a0, a1);
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
#endif

}  // namespace

template <typename scalar_t>
bool sum_squares_rows(const RowMatrix<scalar_t>& m, int64_t i0, int64_t i1, double* out) {
  const int64_t D = m.D;
  bool ok = true;
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = i0; i < i1; ++i) {
      out[i - i0] = sum_squares_scalar(m.row(i), D);
      ok &= all_finite(m.row(i), D);
    }
    return ok;
  } else {
#ifdef VQK_X86
    const CpuFeatures& f = cpu_features();
    if (f.avx512) {
      for (int64_t i = i0; i < i1; ++i) ok &= std::isfinite(out[i - i0] = sum_squares_avx512(m.row(i), D));
      return ok;
    }
    if (f.avx2_fma) {
      for (int64_t i = i0; i < i1; ++i) ok &= std::isfinite(out[i - i0] = sum_squares_avx2(m.row(i), D));
      return ok;
    }
#endif
    for (int64_t i = i0; i < i1; ++i) ok &= std::isfinite(out[i - i0] = sum_squares_scalar(m.row(i), D));
    return ok;
  }
}

template bool sum_squares_rows<float>(const RowMatrix<float>&, int64_t, int64_t, double*);
template bool sum_squares_rows<double>(const RowMatrix<double>&, int64_t, int64_t, double*);
template bool sum_squares_rows<at::BFloat16>(const RowMatrix<at::BFloat16>&, int64_t, int64_t, double*);
template bool sum_squares_rows<at::Half>(const RowMatrix<at::Half>&, int64_t, int64_t, double*);

}  // namespace vqkernels::cpu
