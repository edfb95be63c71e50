// A tile kernel for searches of fewer than 16 input rows (retrieval; one row, or a few, against a huge codebook), of
// tile_gemm.h's interface. A GEMM kernel vectorises over the input rows of the tile, so with one or a few rows most
// of its lanes idle; this kernel vectorises over D instead: each code row is read once, where it lies, converted to
// fp32 on the fly (bf16 and fp16 exactly), multiplied by every input row of the block (packed in fp32, in L1) and
// the fp32 lane sums reduced horizontally. The result is the dot product in fp32 accumulation, like the GEMM
// kernels' (README "Method" §1.1), in another summation order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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
    std::vector<float> xs;  // [nc, Dp] the input rows of the block in fp32, zero-padded to Dp
    int64_t nc = 0;
  };

  // isa: the vector width to run (EpilogueKind::Avx512, Avx2 or Scalar; the caller checked the CPU has it).
  GemvTile(const RowMatrix<scalar_t>& rows, const RowMatrix<scalar_t>& cols, EpilogueKind isa)
      : rows_(rows), cols_(cols), isa_(isa), Dp_((rows.D + 15) / 16 * 16) {}

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
  int64_t Dp_;
};

}  // namespace vqkernels::cpu
