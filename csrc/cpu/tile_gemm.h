// Tile GEMMs of the CPU drivers: out[j * ldt + c] = rows[r0 + j] . cols[c0 + c] for a tile of m rows and nc
// columns, accumulated and stored in acc_t. In both drivers the rows are the codes and the columns the input rows
// (search.cpp, sample.cpp): the codebook is read where it lies, never copied or re-laid out, and only a block of
// input rows is packed, once per block, for all the code tiles it meets (README "Backends").
//
// The drivers are templates on a tile kernel with this interface, so a kernel for another ISA is one more class
// and one more case where the driver picks its kernel (cpu_features.h):
//   using scalar_t, acc_t;
//   static constexpr int64_t kRowAlign;  code tiles start at multiples of it (the last one may be shorter);
//   static constexpr int64_t kRowPad;    tile rows the kernel may write past m (the buffer holds m + kRowPad);
//   static constexpr int64_t kColAlign;  it may write up to round_up(nc, kColAlign) columns (ldt is at least that);
//   struct Scratch;                      per-thread state: the packed column block;
//   void load_cols(Scratch&, c0, nc) const;                      pack columns c0 .. c0 + nc - 1;
//   void tile(Scratch&, r0, m, nc, acc_t* out, int64_t ldt) const;  rows r0 .. r0 + m - 1 against them;
//   void release() const;                once per thread, after its last tile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace vqkernels::cpu {

// A matrix of rows with unit stride along D: a pointer, its row stride and D.
template <typename scalar_t>
struct RowMatrix {
  const scalar_t* data;
  int64_t ld;  // elements between consecutive rows (>= D)
  int64_t rows, D;
  const scalar_t* row(int64_t i) const { return data + i * ld; }
};

// The rows of G groups (the batched form, README "Method" §1.6): group g's matrix starts gs elements after group
// g - 1's, each with unit stride along D. A 2-D operand is one group. The head split x.view(N, G, D).transpose(0, 1)
// is gs = D, ld = G * D: read where it lies, like any row-strided view.
template <typename scalar_t>
struct GroupedRows {
  const scalar_t* data;
  int64_t gs;  // elements between consecutive groups
  int64_t ld;  // elements between consecutive rows of a group
  int64_t G, rows, D;
  RowMatrix<scalar_t> group(int64_t g) const { return {data + g * gs, ld, rows, D}; }
  const scalar_t* row(int64_t g, int64_t i) const { return data + g * gs + i * ld; }
};

// f(g, i0, i1) for each group's share of the rows [r0, r1) of all groups together (row r is row r % rows of group
// r / rows): the flat ranges at::parallel_for hands out, cut at group boundaries.
template <typename F>
void for_group_ranges(int64_t r0, int64_t r1, int64_t rows, F&& f) {
  while (r0 < r1) {
    const int64_t g = r0 / rows, i0 = r0 - g * rows, i1 = std::min(rows, i0 + (r1 - r0));
    f(g, i0, i1);
    r0 += i1 - i0;
  }
}

// fp32 / bf16 / fp16 on ATen's brgemm (oneDNN's ukernel where the CPU has one, AMX tiles included, else its
// fallback) with the column block transposed into a D x nc buffer; fp64 (and fp32 where brgemm is missing) on
// at::mm over views of the two blocks where they lie. Inside at::parallel_for both run single-threaded.
template <typename scalar_t_>
struct AtenTileGemm {
  using scalar_t = scalar_t_;
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr int64_t kRowAlign = 1;
  static constexpr int64_t kRowPad = 0;
  static constexpr int64_t kColAlign = 1;
  struct Scratch {
    std::vector<scalar_t> colsT;  // [D, ldb]: the column block, transposed (brgemm's B)
    const scalar_t* cols = nullptr;  // the column block where it lies (at::mm's)
    int64_t ldb = 0;
  };

  RowMatrix<scalar_t> rows, cols;

  AtenTileGemm(const RowMatrix<scalar_t>& rows_, const RowMatrix<scalar_t>& cols_) : rows(rows_), cols(cols_) {}

  static constexpr bool brgemm_available() {
    if constexpr (std::is_same_v<scalar_t, float>) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
      return true;
#endif
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
      return true;
#endif
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
#ifdef CPUBLAS_BRGEMM_F16F16F32
      return true;
#endif
    }
    return false;
  }

  void load_cols(Scratch& s, int64_t c0, int64_t nc) const {
    s.cols = cols.row(c0);
    if constexpr (brgemm_available()) {
      const int64_t D = cols.D;
      s.ldb = nc;
      s.colsT.resize(size_t(D) * nc);
      for (int64_t c = 0; c < nc; ++c) {
        const scalar_t* src = cols.row(c0 + c);
        for (int64_t d = 0; d < D; ++d) s.colsT[d * nc + c] = src[d];
      }
    }
  }

  void tile(Scratch& s, int64_t r0, int64_t m, int64_t nc, acc_t* out, int64_t ldt) const {
    const int64_t D = rows.D;
    if constexpr (brgemm_available()) {
      at::native::cpublas::brgemm(m, nc, D, /*ld_a=*/rows.ld, /*ld_b=*/s.ldb, /*ld_c=*/ldt, /*add_C=*/false,
                                  rows.row(r0), s.colsT.data(), out, /*is_vnni=*/false);
    } else {
      static_assert(std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>,
                    "low-precision inputs need ATen's brgemm (torch >= 2.6)");
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
      auto a = at::from_blob(const_cast<scalar_t*>(rows.row(r0)), {m, D}, {rows.ld, 1}, opts);
      auto b = at::from_blob(const_cast<scalar_t*>(s.cols), {nc, D}, {cols.ld, 1}, opts);
      auto c = at::from_blob(out, {m, nc}, {ldt, 1}, opts);
      at::mm_out(c, a, b.t());
    }
  }

  void release() const {
    if constexpr (brgemm_available()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  }
};

}  // namespace vqkernels::cpu
