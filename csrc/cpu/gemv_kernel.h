// A tile kernel for searches of fewer than 16 input rows (retrieval; one row, or a few, against a huge codebook), of
// tile_gemm.h's interface. A GEMM kernel vectorises over the input rows of the tile, so with one or a few rows most
// of its lanes idle; this kernel vectorises over D instead: each code row is read once, where it lies, converted to
// fp32 on the fly (bf16 and fp16 exactly), multiplied by every input row of the block (packed in fp32, in L1) and
// the fp32 lane sums reduced horizontally. The result is the dot product in fp32 accumulation, like the GEMM
// kernels' (README "Method" §1.1), in another summation order. bf16 on a CPU with AVX512-BF16 skips the conversion:
// vdpbf16ps multiplies the stored code by the row (packed in bf16) exactly and accumulates in fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {

template <typename scalar_t_>
class GemvTile {
 public:
  using scalar_t = scalar_t_;
  using acc_t = float;
  static constexpr int64_t kRowAlign = 1;
  static constexpr int64_t kRowPad = 0;
  static constexpr int64_t kColAlign = 1;
  struct Scratch {
    std::vector<float> xs;          // [nc, Dp] the input rows of the block in fp32, zero-padded to Dp
    std::vector<at::BFloat16> xb;   // [nc, Dp] the same in bf16 (the vdpbf16ps form)
    std::vector<float> sq32;        // [m] the vdpbf16ps form's fp32 sums of squares
    int64_t nc = 0;
  };

  // isa: the vector width to run (EpilogueKind::Avx512, Avx2 or Scalar; the caller checked the CPU has it).
  // bf16dot (bf16 only, on a CPU with AVX512-BF16): products through vdpbf16ps (the "gemv-avx512bf16" tile),
  // squares in fp32 from the same instruction, or in fp64 by a second pass over the tile with fp64_squares (exact
  // mode re-scores with the norms); else every element is converted to fp32 and the squares summed in fp64.
  GemvTile(const RowMatrix<scalar_t>& rows, const RowMatrix<scalar_t>& cols, EpilogueKind isa, bool bf16dot = false,
           bool fp64_squares = true)
      : rows_(rows),
        cols_(cols),
        isa_(isa),
        bf16dot_(bf16dot && std::is_same_v<scalar_t, at::BFloat16>),
        fp64_squares_(fp64_squares),
        Dp_((rows.D + 31) / 32 * 32) {}

  void load_cols(Scratch& s, int64_t c0, int64_t nc) const;
  void tile(Scratch& s, int64_t r0, int64_t m, int64_t nc, float* out, int64_t ldt) const {
    tile_norms(s, r0, m, nc, out, ldt, nullptr);
  }
  // tile() and, in the same pass over each code (one read of a huge codebook instead of two), the codes' fp64
  // sums of squares into sq[0 .. m) (null: not wanted).
  static constexpr bool kFusesNorms = true;
  void tile_norms(Scratch& s, int64_t r0, int64_t m, int64_t nc, float* out, int64_t ldt, double* sq) const;
  void release() const {}

 private:
  RowMatrix<scalar_t> rows_, cols_;
  EpilogueKind isa_;
  bool bf16dot_, fp64_squares_;
  int64_t Dp_;
};

}  // namespace vqkernels::cpu
