// bf16 tile GEMM on AVX512-BF16 (vdpbf16ps), a tile kernel of tile_gemm.h's interface: rows are the codes, read
// where they lie (a code's consecutive bf16 pairs are broadcast as 32-bit words), columns are the input rows,
// packed once per block into panels of 32 in VNNI pair order (panel p, pair j: [x_0(2j), x_0(2j+1), x_1(2j), ...,
// x_31(2j+1)], two zmm). Odd D and missing columns are zero-padded on the packed side, and a code's last element
// of odd D is read alone, so nothing is read past a code and 0 * x never meets an element of another code. Each
// pair of products is exact in fp32 and accumulated in fp32 (vdpbf16ps: RNE, denormals flushed).
//
// ATen's brgemm has no fast bf16 path on CPUs with AVX512-BF16 but no AMX (it falls back to a generic GEMM at under
// half the vdpbf16ps peak), so those CPUs get this kernel; on AMX CPUs brgemm runs on the tiles and wins
// (cpu_features.h chooses).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cpu_features.h"
#include "tile_gemm.h"

namespace vqkernels::cpu {

constexpr int kBfPanel = 32;  // columns per packed panel (two zmm of 16 fp32 lanes)
constexpr int kBfMR = 12;     // codes per micro-tile: 24 accumulators + 2 B panels + 1 broadcast of 32 zmm

#ifdef VQK_X86
class Bf16Avx512Gemm {
 public:
  using scalar_t = at::BFloat16;
  using acc_t = float;
  static constexpr int64_t kRowAlign = kBfMR;
  static constexpr int64_t kRowPad = kBfMR - 1;
  static constexpr int64_t kColAlign = kBfPanel;
  struct Scratch {
    std::vector<uint16_t> b;     // the packed column block: panels x D2 x 64 bf16 bit patterns
    std::vector<uint16_t> tail;  // a last micro-tile of fewer than kBfMR codes, zero-padded (kBfMR x D)
    int64_t panels = 0;
  };

  // Call only where cpu_features().avx512bf16.
  Bf16Avx512Gemm(const RowMatrix<at::BFloat16>& rows, const RowMatrix<at::BFloat16>& cols)
      : rows_(rows), cols_(cols), D2((rows.D + 1) / 2) {}

  void load_cols(Scratch& s, int64_t c0, int64_t nc) const;
  // out[j, 0:round_up(nc, 32)] (row stride ldt) for j < round_up(m, kBfMR).
  void tile(Scratch& s, int64_t r0, int64_t m, int64_t nc, float* out, int64_t ldt) const;
  void release() const {}

 private:
  RowMatrix<at::BFloat16> rows_, cols_;
  int64_t D2;
};

// Rows i0 .. i0 + n - 1 of m rounded to bf16 (to nearest even, vcvtneps2bf16) into buf [n, D], contiguous.
// Call only where cpu_features().avx512bf16.
void round_rows_to_bf16(const RowMatrix<float>& m, int64_t i0, int64_t n, std::vector<at::BFloat16>& buf);

// Per row of m (rows i0 .. i1 - 1): |v|^2, |v - bf16(v)|^2 and |bf16(v)|^2 in fp64, bf16(v) rounded exactly as
// round_rows_to_bf16 rounds it, into sq / resid / rounded [i1 - i0]. Call only where cpu_features().avx512bf16.
void bf16_rounding_norms(const RowMatrix<float>& m, int64_t i0, int64_t i1, double* sq, double* resid,
                         double* rounded);

// fp32 operands rounded to bf16 on their way into a bf16 tile kernel (Inner: Bf16Avx512Gemm, or ATen's brgemm,
// which runs on AMX tiles where the CPU has them): the column block when it is packed, each code tile into a
// per-thread buffer of the tile's size (the codebook is never copied whole). The dot products are those of the
// rounded operands, off the fp32 ones by up to about 2^-7 |x| |c|: this is the prefilter of the fp32
// "avx512bf16+rescore" / "brgemm+rescore" searches (search.cpp), which re-score their candidates in fp64.
template <typename Inner>
class RoundedToBf16 {
 public:
  using scalar_t = float;
  using acc_t = float;
  static constexpr int64_t kRowAlign = Inner::kRowAlign;
  static constexpr int64_t kRowPad = Inner::kRowPad;
  static constexpr int64_t kColAlign = Inner::kColAlign;
  struct Scratch {
    typename Inner::Scratch inner;
    std::vector<at::BFloat16> cols, rows;  // the column block [nc, D] and the current code tile [m, D], rounded
    int64_t nc = 0;
  };

  // Call only where cpu_features().avx512bf16.
  RoundedToBf16(const RowMatrix<float>& rows, const RowMatrix<float>& cols) : rows_(rows), cols_(cols) {}

  void load_cols(Scratch& s, int64_t c0, int64_t nc) const {
    round_rows_to_bf16(cols_, c0, nc, s.cols);
    s.nc = nc;
    inner(nullptr, 0, s).load_cols(s.inner, 0, nc);
  }
  void tile(Scratch& s, int64_t r0, int64_t m, int64_t nc, float* out, int64_t ldt) const {
    round_rows_to_bf16(rows_, r0, m, s.rows);
    inner(s.rows.data(), m, s).tile(s.inner, 0, m, nc, out, ldt);
  }
  void release() const {
    const int64_t D = rows_.D;
    Inner({nullptr, D, 0, D}, {nullptr, D, 0, D}).release();
  }

 private:
  Inner inner(const at::BFloat16* rows, int64_t m, const Scratch& s) const {
    const int64_t D = rows_.D;
    return Inner({rows, D, m, D}, {s.cols.data(), D, s.nc, D});
  }
  RowMatrix<float> rows_, cols_;
};
#endif

}  // namespace vqkernels::cpu
