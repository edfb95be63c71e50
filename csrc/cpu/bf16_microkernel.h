// bf16 tile GEMM on AVX512-BF16 (vdpbf16ps), a tile kernel of tile_gemm.h's interface. ATen's brgemm has no fast
// bf16 path on CPUs with AVX512-BF16 but no AMX (it falls back to a generic GEMM at under half the dpbf16 peak), so
// bf16 gets its own register-blocked micro-kernel. The columns are packed once per call into panels of 32 in VNNI
// pair order (panel p, pair j: [c_0(2j), c_0(2j+1), c_1(2j), ..., c_31(2j+1)], two zmm); a row block is packed per
// block into D2 = ceil(D/2) 32-bit pairs per row (odd D and missing columns are zero-padded, which adds 0 to the
// dot). Each pair of products is exact in fp32 and accumulated in fp32 (vdpbf16ps: RNE, denormals flushed).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "isa.h"

namespace vqkernels::cpu {

constexpr int kBfPanel = 32;  // columns per packed panel (two zmm of 16 fp32 lanes)
constexpr int kBfMR = 12;     // rows per micro-tile: 24 accumulators + 2 B panels + 1 broadcast of 32 zmm

#ifdef VQK_X86
class Bf16Avx512Gemm {
 public:
  using scalar_t = at::BFloat16;
  using acc_t = float;
  static constexpr int64_t kColAlign = kBfPanel;
  static constexpr int64_t kRowPad = kBfMR;
  using Scratch = std::vector<uint32_t>;  // the packed row block

  // Call only where cpu_has_avx512bf16().
  Bf16Avx512Gemm(const at::Tensor& rows, const at::Tensor& cols);

  // rows r0..r0+m into the scratch (round_up(m, kBfMR) rows of D2 pairs; padding rows and odd-D halves are 0).
  void load_rows(Scratch& a, int64_t r0, int64_t m) const;
  // tile[r, 0:round_up(nc, 32)] (ld = ldt) = row block . cols[c0 : c0 + nc]^T; c0 is a multiple of kBfPanel.
  int64_t tile(Scratch& a, int64_t r0, int64_t m, int64_t c0, int64_t nc, float* out, int64_t ldt) const;
  void release() const {}

 private:
  const at::BFloat16* rows_;
  int64_t D, D2, C, panels;
  std::vector<uint16_t> b;  // panels x D2 x 64 bf16 bit patterns
};
#endif

// Which tile GEMM bf16 inputs get on this CPU (reported by `python -m vqkernels.info`).
const char* bf16_tile_kernel();

}  // namespace vqkernels::cpu
