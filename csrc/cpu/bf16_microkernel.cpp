// The AVX512-BF16 micro-kernel and its packing (bf16_microkernel.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see epilogues_avx512.cpp)
#endif
#include "bf16_microkernel.h"

#include <algorithm>
#include <cstring>

#ifdef VQK_X86
#include <immintrin.h>
#endif

namespace vqkernels::cpu {

#ifdef VQK_X86
namespace {

// c[r, 0:32] = sum_d a_r[d] b[d, :] for r < kBfMR: a_r the bf16 row a + r * lda (D elements), b one packed panel
// (D2 pairs x 2 zmm), c row stride ldc.
__attribute__((target("avx512f,avx512bf16"))) void bf16_microkernel(const uint16_t* a, int64_t lda, int64_t D,
                                                                    const uint16_t* b, float* c, int64_t ldc) {
  __m512 acc0[kBfMR], acc1[kBfMR];
  const uint16_t* ar[kBfMR];
#pragma GCC unroll 12
  for (int r = 0; r < kBfMR; ++r) {
    acc0[r] = acc1[r] = _mm512_setzero_ps();
    ar[r] = a + r * lda;
  }
  const int64_t full = D / 2;
  for (int64_t j = 0; j < full; ++j) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel + kBfPanel);
#pragma GCC unroll 12
    for (int r = 0; r < kBfMR; ++r) {
      int32_t pair;
      std::memcpy(&pair, ar[r] + 2 * j, sizeof(pair));  // two consecutive bf16 of code r, as one word
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
    }
  }
  if (D & 1) {  // the last element alone (its pair partner is 0 on both sides)
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + full * 2 * kBfPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + full * 2 * kBfPanel + kBfPanel);
#pragma GCC unroll 12
    for (int r = 0; r < kBfMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(ar[r][D - 1]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kBfMR; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc0[r]);
    _mm512_storeu_ps(c + r * ldc + 16, acc1[r]);
  }
}

}  // namespace

namespace {

// n fp32 values to bf16, rounded to nearest even (vcvtneps2bf16).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void round_to_bf16(const float* src, int64_t n,
                                                                                    at::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(dst + i, k, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, src + i)));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rounding_norms_row(const float* v, int64_t D,
                                                                                         double* out) {
  __m512d s = _mm512_setzero_pd(), r = s, t = s;
  for (int64_t d = 0; d < D; d += 16) {
    const int64_t n = D - d < 16 ? D - d : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
    const __m512 f = _mm512_maskz_loadu_ps(k, v + d);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(f);
    const __m512 fr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    const __m512 e = _mm512_sub_ps(f, fr);  // exact: fr is f rounded to 8 significant bits
    for (int half = 0; half < 2; ++half) {
      const __m256 fh = half ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)) : _mm512_castps512_ps256(f);
      const __m256 eh = half ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)) : _mm512_castps512_ps256(e);
      const __m256 rh = half ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fr), 1)) : _mm512_castps512_ps256(fr);
      s = _mm512_fmadd_pd(_mm512_cvtps_pd(fh), _mm512_cvtps_pd(fh), s);
      r = _mm512_fmadd_pd(_mm512_cvtps_pd(eh), _mm512_cvtps_pd(eh), r);
      t = _mm512_fmadd_pd(_mm512_cvtps_pd(rh), _mm512_cvtps_pd(rh), t);
    }
  }
  out[0] = _mm512_reduce_add_pd(s);
  out[1] = _mm512_reduce_add_pd(r);
  out[2] = _mm512_reduce_add_pd(t);
}

}  // namespace

void bf16_rounding_norms(const RowMatrix<float>& m, int64_t i0, int64_t i1, double* sq, double* resid,
                         double* rounded) {
  double o[3];
  for (int64_t i = i0; i < i1; ++i) {
    rounding_norms_row(m.row(i), m.D, o);
    sq[i - i0] = o[0];
    resid[i - i0] = o[1];
    rounded[i - i0] = o[2];
  }
}

void round_rows_to_bf16(const RowMatrix<float>& m, int64_t i0, int64_t n, std::vector<at::BFloat16>& buf) {
  buf.resize(size_t(n) * m.D);
  for (int64_t i = 0; i < n; ++i) round_to_bf16(m.row(i0 + i), m.D, buf.data() + i * m.D);
}

void Bf16Avx512Gemm::load_cols(Scratch& s, int64_t c0, int64_t nc) const {
  const int64_t D = cols_.D;
  s.panels = (nc + kBfPanel - 1) / kBfPanel;
  s.b.assign(size_t(s.panels) * D2 * 2 * kBfPanel, 0);
  for (int64_t c = 0; c < nc; ++c) {
    uint16_t* dst = s.b.data() + size_t(c / kBfPanel) * D2 * 2 * kBfPanel + 2 * (c % kBfPanel);
    const at::BFloat16* src = cols_.row(c0 + c);
    for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 2 * kBfPanel + (d & 1)] = src[d].x;
  }
}

void Bf16Avx512Gemm::tile(Scratch& s, int64_t r0, int64_t m, int64_t /*nc*/, float* out, int64_t ldt) const {
  const int64_t D = rows_.D;
  for (int64_t r = 0; r < m; r += kBfMR) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(rows_.row(r0 + r));
    int64_t lda = rows_.ld;
    if (m - r < kBfMR) {  // fewer codes than a micro-tile left: a zero-padded copy (never read past the codebook)
      s.tail.assign(size_t(kBfMR) * D, 0);
      for (int64_t j = 0; j < m - r; ++j) std::memcpy(s.tail.data() + j * D, rows_.row(r0 + r + j), 2 * D);
      a = s.tail.data();
      lda = D;
    }
    for (int64_t p = 0; p < s.panels; ++p) {
      bf16_microkernel(a, lda, D, s.b.data() + size_t(p) * D2 * 2 * kBfPanel, out + r * ldt + p * kBfPanel, ldt);
    }
  }
}
#endif

}  // namespace vqkernels::cpu
