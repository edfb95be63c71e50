// The AVX512-BF16 micro-kernel and its packing (bf16_microkernel.h).
#include "bf16_microkernel.h"

#include <ATen/Parallel.h>

#ifdef VQK_X86
#include <immintrin.h>
#endif

namespace vqkernels::cpu {

#ifdef VQK_X86
namespace {

// c[r, 0:32] = sum_j dot2(a[r, j], b[j, :]) for r < kBfMR; a: kBfMR rows of D2 pairs (stride D2), b: D2 x 2 zmm.
__attribute__((target("avx512f,avx512bf16"))) void bf16_microkernel(const uint32_t* a, int64_t D2,
                                                                    const uint16_t* b, float* c, int64_t ldc) {
  __m512 acc0[kBfMR], acc1[kBfMR];
#pragma GCC unroll 12
  for (int r = 0; r < kBfMR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < D2; ++j) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + j * 2 * kBfPanel + kBfPanel);
#pragma GCC unroll 12
    for (int r = 0; r < kBfMR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * D2 + j]));
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

Bf16Avx512Gemm::Bf16Avx512Gemm(const at::Tensor& rows, const at::Tensor& cols)
    : rows_(rows.const_data_ptr<at::BFloat16>()),
      D(cols.size(1)),
      D2((cols.size(1) + 1) / 2),
      C(cols.size(0)),
      panels((cols.size(0) + kBfPanel - 1) / kBfPanel) {
  const at::BFloat16* cb = cols.const_data_ptr<at::BFloat16>();
  b.assign(size_t(panels) * D2 * 2 * kBfPanel, 0);
  at::parallel_for(0, panels, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint16_t* dst = b.data() + size_t(p) * D2 * 2 * kBfPanel;
      for (int64_t c = 0; c < kBfPanel && p * kBfPanel + c < C; ++c) {
        const at::BFloat16* src = cb + (p * kBfPanel + c) * D;
        for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 2 * kBfPanel + 2 * c + (d & 1)] = src[d].x;
      }
    }
  });
}

void Bf16Avx512Gemm::load_rows(Scratch& a, int64_t r0, int64_t m) const {
  const int64_t mp = (m + kBfMR - 1) / kBfMR * kBfMR;
  a.assign(size_t(mp) * D2, 0u);
  auto* a16 = reinterpret_cast<uint16_t*>(a.data());
  for (int64_t r = 0; r < m; ++r) {
    const at::BFloat16* src = rows_ + (r0 + r) * D;
    for (int64_t d = 0; d < D; ++d) a16[r * 2 * D2 + d] = src[d].x;
  }
}

int64_t Bf16Avx512Gemm::tile(Scratch& a, int64_t /*r0*/, int64_t m, int64_t c0, int64_t nc, float* out,
                             int64_t ldt) const {
  const int64_t p0 = c0 / kBfPanel, p1 = (c0 + nc + kBfPanel - 1) / kBfPanel;
  for (int64_t r = 0; r < m; r += kBfMR) {
    for (int64_t p = p0; p < p1; ++p) {
      bf16_microkernel(a.data() + r * D2, D2, b.data() + size_t(p) * D2 * 2 * kBfPanel,
                       out + r * ldt + (p - p0) * kBfPanel, ldt);
    }
  }
  return ldt;
}
#endif

const char* bf16_tile_kernel() {
#ifdef VQK_X86
  if (cpu_has_avx512bf16()) return "avx512_bf16 micro-kernel (VQK_CPU_BF16_BRGEMM=1: ATen brgemm)";
#endif
  return "ATen brgemm";
}

}  // namespace vqkernels::cpu
