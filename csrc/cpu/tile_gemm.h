// Tile GEMMs of the CPU search and sampling drivers: out[r, j] = rows[r0 + r] . cols[c0 + j] for a block of m rows
// and nc columns, accumulated and stored in acc_t. In the search the rows are the inputs and the columns the codes;
// sampling swaps the roles (README "Method" §1).
//
// The drivers are templates on a tile kernel with this interface, so a kernel for another ISA (AMX tiles, NEON)
// is one more class and one more branch where the driver picks its kernel:
//   using scalar_t, acc_t;
//   static constexpr int64_t kColAlign;  column blocks start at multiples of it, and the kernel may write up to
//                                        round_up(nc, kColAlign) columns of a tile row;
//   static constexpr int64_t kRowPad;    rows the kernel may write past m (the tile buffer holds m + kRowPad);
//   struct Scratch;                      per-thread state (for instance a packed copy of the row block);
//   void load_rows(Scratch&, r0, m) const;  once per row block, before its tiles;
//   int64_t tile(Scratch&, r0, m, c0, nc, acc_t* out, int64_t ldt) const;  fills the tile and returns the
//                                        leading dimension it used (<= ldt, the buffer's);
//   void release() const;                once per thread, after its last tile.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <type_traits>

#include "common.h"

namespace vqkernels::cpu {

// float / bf16 / fp16 on ATen's brgemm (oneDNN's ukernel where the CPU has one, else its BLAS fallback) against a
// D x C transposed copy of the columns; fp64 on at::mm_out. Called inside at::parallel_for, both run
// single-threaded.
template <typename scalar_t_>
struct AtenTileGemm {
  using scalar_t = scalar_t_;
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr int64_t kColAlign = 1;
  static constexpr int64_t kRowPad = 0;
  struct Scratch {};

  const scalar_t* rows;  // [R, D]
  const scalar_t* cols;  // [C, D]
  at::Tensor colsT;      // [D, C] when brgemm is used
  int64_t D, C;

  AtenTileGemm(const at::Tensor& rows_, const at::Tensor& cols_) : D(rows_.size(1)), C(cols_.size(0)) {
    rows = rows_.const_data_ptr<scalar_t>();
    cols = cols_.const_data_ptr<scalar_t>();
    if constexpr (brgemm_available()) colsT = cols_.t().contiguous();
  }

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

  void load_rows(Scratch&, int64_t, int64_t) const {}

  int64_t tile(Scratch&, int64_t r0, int64_t m, int64_t c0, int64_t nc, acc_t* out, int64_t /*ldt*/) const {
    if constexpr (brgemm_available()) {
      at::native::cpublas::brgemm(m, nc, D, /*ld_a=*/D, /*ld_b=*/C, /*ld_c=*/nc, /*add_C=*/false, rows + r0 * D,
                                  colsT.const_data_ptr<scalar_t>() + c0, out, /*is_vnni=*/false);
    } else {
      static_assert(std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>,
                    "low-precision inputs need ATen's brgemm (torch >= 2.6)");
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
      auto a = at::from_blob(const_cast<scalar_t*>(rows + r0 * D), {m, D}, opts);
      auto b = at::from_blob(const_cast<scalar_t*>(cols + c0 * D), {nc, D}, opts);
      auto c = at::from_blob(out, {m, nc}, opts);
      at::mm_out(c, a, b.t());
    }
    return nc;
  }

  void release() const {
    if constexpr (brgemm_available()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  }
};

}  // namespace vqkernels::cpu
