// The AVX512-BF16 micro-kernel and its packing (bf16_microkernel.h).
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
